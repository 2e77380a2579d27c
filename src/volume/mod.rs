//! The I/O shell around one volume's engine: opens the metadata and the
//! store, runs the engine in one task, carries out its actions (local I/O,
//! peer requests, metadata writes, announcements) and feeds the results back.
//! Frontends talk to a `VolumeHandle`; local reads bypass the engine task.

mod create;
mod quorum;
mod shell;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::engine::{DemoteError, EngineStatus, IoFailure, Op, PromoteError, Range, ReadPath};
use crate::link::{InboundRequest, PeerConnection, VolumeStateMsg};
use crate::meta::MetaError;
use crate::store::{AlignedBuf, BlockStore, StoreError};

pub use create::create_metadata;
pub use quorum::{QuorumAttach, VolumeLease};
pub use shell::{AttachOptions, EventHook, ExportHook, attach, open_meta};

/// Client requests in flight per volume (each pins at most two activity-log
/// extents, so this stays well below the log's capacity).
pub const CLIENT_INFLIGHT_MAX: usize = 256;

/// Bytes of client request data (write payloads read from a client, read
/// data not yet sent back) a frontend may hold for one volume at once,
/// over all its connections: a client that pipelines large requests, or
/// does not read its replies, waits instead of growing the daemon.
pub const CLIENT_INFLIGHT_BYTES_MAX: usize = 64 << 20;

/// Errors of volume operations.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The engine refused or failed the request.
    #[error(transparent)]
    Io(#[from] IoFailure),
    /// A local read failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Metadata problem at attach.
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// Promotion refused.
    #[error(transparent)]
    Promote(#[from] PromoteError),
    /// Demotion refused.
    #[error(transparent)]
    Demote(#[from] DemoteError),
    /// Verify or resync refused.
    #[error(transparent)]
    Maintenance(#[from] crate::engine::MaintenanceError),
    /// The request is outside the volume or misaligned.
    #[error("request at {offset}+{len} is outside the volume or not 4 KiB aligned")]
    OutOfRange {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// The volume was detached.
    #[error("volume is detached")]
    Detached,
    /// The volume stopped, but its final metadata write (the clean-stop
    /// mark, after a flush of the data disk) failed.
    #[error(
        "volume stopped, but its final metadata write failed (the data disk or the metadata device failed): its superblock does not record a clean stop, so the next attach treats the copy as after a crash; check the disk (see the daemon log) before you attach it again"
    )]
    StoppedUnclean,
    /// Something else, explained.
    #[error("{0}")]
    Other(String),
}

/// Snapshot for `status`.
#[derive(Clone, Debug)]
pub struct VolumeStatus {
    /// Engine state.
    pub engine: EngineStatus,
    /// Name of the peer node.
    pub peer_name: String,
    /// Whether the peer link is up.
    pub connected: bool,
    /// Link round-trip time in microseconds, when connected.
    pub rtt_us: Option<u64>,
    /// Usable size.
    pub data_bytes: u64,
    /// Backing disk path.
    pub disk_path: PathBuf,
    /// Bytes per bitmap bit.
    pub chunk_bytes: u64,
    /// Seconds since the running resync started (this node the source).
    pub resync_elapsed_s: Option<f64>,
    /// With a witness: whether a fresh lease lets this node serve as primary.
    pub lease_valid: Option<bool>,
    /// With a witness: whether it answered the last request.
    pub witness_reachable: Option<bool>,
    /// Client requests held because the primary has no lease (rule 7;
    /// "frozen" means held for the sync source, see the engine).
    pub held_for_lease_requests: usize,
    /// Metadata writes (bitmap pages, activity log, superblock; one per
    /// group commit) since attach.
    pub metadata_writes: u64,
    /// While this node is a sync target: what the source announced it had
    /// to copy when the resync started, what arrived since, and for how
    /// long (the source keeps the authoritative count).
    pub target_progress: Option<TargetProgress>,
}

/// A sync target's view of its resync (see `VolumeStatus::target_progress`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TargetProgress {
    /// Bytes the source had marked to copy when the resync started.
    pub total_bytes: u64,
    /// Resync bytes received and written since (a chunk copied again, or
    /// application writes mirrored meanwhile, can make it overshoot: it is
    /// capped at `total_bytes` in reports).
    pub received_bytes: u64,
    /// Seconds since the resync started.
    pub elapsed_s: f64,
}

pub(crate) enum Input {
    Submit {
        op: Op,
        range: Range,
        buf: Option<Arc<AlignedBuf>>,
        reply: oneshot::Sender<Result<Option<AlignedBuf>, VolumeError>>,
    },
    LocalDone {
        id: u64,
        ok: bool,
    },
    LocalRead {
        id: u64,
        data: Option<AlignedBuf>,
    },
    PeerDone {
        id: u64,
        ok: bool,
        data: Option<AlignedBuf>,
    },
    DiskFailed,
    MetaDone {
        write: shell::MetaWrite,
        ok: bool,
    },
    Connected(Arc<PeerConnection>),
    Disconnected,
    PeerState(u64, VolumeStateMsg),
    Replica(Arc<PeerConnection>, InboundRequest),
    ReplicaDone,
    Promote {
        force: bool,
        reply: oneshot::Sender<Result<(), VolumeError>>,
    },
    Demote {
        reply: oneshot::Sender<Result<(), VolumeError>>,
    },
    Status {
        reply: oneshot::Sender<VolumeStatus>,
    },
    Detach {
        reply: oneshot::Sender<Result<(), VolumeError>>,
    },
    Verify {
        reply: oneshot::Sender<Result<(), VolumeError>>,
    },
    Resync {
        checksum: bool,
        reply: oneshot::Sender<Result<bool, VolumeError>>,
    },
    DiscardLocal {
        reply: oneshot::Sender<Result<(), VolumeError>>,
    },
    VerifyDone {
        id: u64,
        equal: Option<bool>,
    },
    PromoteRetry {
        force: bool,
        until_ms: u64,
        reply: oneshot::Sender<Result<(), VolumeError>>,
    },
    PromoteGranted {
        force: bool,
        record: crate::quorum::Record,
        sent_ms: u64,
        reply: oneshot::Sender<Result<(), VolumeError>>,
    },
    WitnessRecord(crate::quorum::Record),
    WitnessChanged(Option<crate::quorum::Record>),
    Tick,
}

const READ_LOCAL: u8 = 0;
const READ_PEER: u8 = 1;
const READ_REFUSE: u8 = 2;

fn encode_read_path(p: ReadPath) -> u8 {
    match p {
        ReadPath::Local => READ_LOCAL,
        ReadPath::Peer => READ_PEER,
        ReadPath::Refuse => READ_REFUSE,
    }
}

/// Longest piece of a zeroing that goes to the engine as one request: four
/// activity-log extents, aligned to four, so a piece spans at most four of
/// the at least [`AL_EXTENTS_MIN`](crate::meta::activity_log::AL_EXTENTS_MIN)
/// extents a log holds.
pub const ZEROES_PIECE_BYTES: u64 = 4 * crate::meta::activity_log::DEFAULT_AL_EXTENT_BYTES;

const _: () = assert!(
    ZEROES_PIECE_BYTES / crate::meta::activity_log::DEFAULT_AL_EXTENT_BYTES
        < crate::meta::activity_log::AL_EXTENTS_MIN as u64
);

/// `[offset, offset+len)` cut at multiples of [`ZEROES_PIECE_BYTES`].
fn zeroes_pieces(offset: u64, len: u64) -> impl Iterator<Item = Range> {
    let end = offset + len;
    let mut at = offset;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let next = ((at / ZEROES_PIECE_BYTES + 1) * ZEROES_PIECE_BYTES).min(end);
        let piece = Range::new(at, next - at);
        at = next;
        Some(piece)
    })
}

/// A cheap, cloneable handle to an attached volume.
#[derive(Clone)]
pub struct VolumeHandle {
    inner: Arc<HandleInner>,
}

struct HandleInner {
    name: String,
    tx: mpsc::UnboundedSender<Input>,
    read_path: Arc<AtomicU8>,
    store: Arc<dyn BlockStore>,
    permits: Semaphore,
    /// [`CLIENT_INFLIGHT_BYTES_MAX`], one permit per byte.
    client_bytes: Arc<Semaphore>,
    data_bytes: u64,
    lease: Option<Arc<VolumeLease>>,
}

impl VolumeHandle {
    /// Volume name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Whether the volume's task has ended (after a detach, even one that
    /// reported an error).
    pub fn is_stopped(&self) -> bool {
        self.inner.tx.is_closed()
    }

    /// Usable size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.inner.data_bytes
    }

    pub(crate) fn send(&self, input: Input) -> Result<(), VolumeError> {
        self.inner.tx.send(input).map_err(|_| VolumeError::Detached)
    }

    /// Reserves `bytes` of the volume's client data budget
    /// ([`CLIENT_INFLIGHT_BYTES_MAX`]) until the permit is dropped; waits
    /// while the budget is spent. A frontend takes it before it allocates a
    /// request's buffer and keeps it until the reply is sent.
    pub async fn reserve_client_bytes(
        &self,
        bytes: u32,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, VolumeError> {
        if bytes as usize > CLIENT_INFLIGHT_BYTES_MAX {
            return Err(VolumeError::OutOfRange {
                offset: 0,
                len: u64::from(bytes),
            });
        }
        self.inner
            .client_bytes
            .clone()
            .acquire_many_owned(bytes)
            .await
            .map_err(|_| VolumeError::Detached)
    }

    /// How much of the client data budget is free now (all of it, when no
    /// client request is in flight).
    pub fn client_bytes_available(&self) -> usize {
        self.inner.client_bytes.available_permits()
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        crate::store::check_range(offset, len, self.inner.data_bytes)
            .map_err(|_| VolumeError::OutOfRange { offset, len })
    }

    /// One of the volume's [`CLIENT_INFLIGHT_MAX`] request permits.
    async fn request_permit(&self) -> Result<tokio::sync::SemaphorePermit<'_>, VolumeError> {
        self.inner
            .permits
            .acquire()
            .await
            .map_err(|_| VolumeError::Detached)
    }

    async fn submit(
        &self,
        op: Op,
        range: Range,
        buf: Option<Arc<AlignedBuf>>,
    ) -> Result<Option<AlignedBuf>, VolumeError> {
        let _permit = self.request_permit().await?;
        let (reply, rx) = oneshot::channel();
        self.send(Input::Submit {
            op,
            range,
            buf,
            reply,
        })?;
        rx.await.map_err(|_| VolumeError::Detached)?
    }

    /// The volume's leases (with a witness).
    pub fn lease(&self) -> Option<&Arc<VolumeLease>> {
        self.inner.lease.as_ref()
    }

    /// A record for this volume arrived with a witness heartbeat.
    pub fn witness_record(&self, record: crate::quorum::Record) {
        let _ = self.send(Input::WitnessRecord(record));
    }

    /// Rule 7: a primary serves reads only while it holds a fresh lease.
    /// Without one it waits (`suspend`) or fails (`io-error`).
    async fn lease_gate(&self) -> Result<(), VolumeError> {
        let Some(lease) = &self.inner.lease else {
            return Ok(());
        };
        while !lease.valid() {
            if lease.policy == crate::quorum::NoQuorumPolicy::IoError {
                return Err(VolumeError::Io(IoFailure::NoQuorum));
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            if self.inner.tx.is_closed() {
                return Err(VolumeError::Detached);
            }
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset` (locally unless this node is diskless).
    pub async fn read(&self, offset: u64, len: usize) -> Result<AlignedBuf, VolumeError> {
        self.check(offset, len as u64)?;
        match self.inner.read_path.load(Ordering::Acquire) {
            READ_LOCAL => {
                // (Local reads count against the volume's requests in
                // flight like every other request.)
                let _permit = self.request_permit().await?;
                self.lease_gate().await?;
                match self.inner.store.read(offset, len).await {
                    Ok(b) => Ok(b),
                    Err(_) => {
                        // The disk failed under a read: detach it and retry via the peer.
                        let (reply, rx) = oneshot::channel();
                        self.send(Input::Submit {
                            op: Op::Read,
                            range: Range::new(offset, len as u64),
                            buf: None,
                            reply,
                        })?;
                        let r = rx.await.map_err(|_| VolumeError::Detached)??;
                        r.ok_or(VolumeError::Io(IoFailure::NoCopy))
                    }
                }
            }
            READ_PEER => self
                .submit(Op::Read, Range::new(offset, len as u64), None)
                .await?
                .ok_or(VolumeError::Io(IoFailure::NoCopy)),
            _ => Err(VolumeError::Io(IoFailure::NotPrimary)),
        }
    }

    /// Writes `buf` at `offset`; completes when every up-to-date node has it.
    pub async fn write(&self, offset: u64, buf: AlignedBuf, fua: bool) -> Result<(), VolumeError> {
        self.check(offset, buf.len() as u64)?;
        let range = Range::new(offset, buf.len() as u64);
        self.submit(Op::Write { fua }, range, Some(Arc::new(buf)))
            .await
            .map(|_| ())
    }

    /// Makes `[offset, offset+len)` read back as zeros on every node.
    ///
    /// A long range (a whole-device discard from `mkfs` or `fstrim` is one
    /// request over NBD) goes to the engine in pieces of at most
    /// [`ZEROES_PIECE_BYTES`], one after another, each of which the
    /// activity log can hold: in one piece it would wait for room forever.
    /// On an error the pieces before it are zeroed and the rest untouched,
    /// as with a failed write.
    pub async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), VolumeError> {
        self.check(offset, len)?;
        for piece in zeroes_pieces(offset, len) {
            self.submit(Op::Zeroes { fua }, piece, None).await?;
        }
        Ok(())
    }

    /// Makes every completed write durable on every up-to-date node.
    pub async fn flush(&self) -> Result<(), VolumeError> {
        self.submit(Op::Flush, Range::new(0, 0), None)
            .await
            .map(|_| ())
    }

    /// Makes this node primary.
    pub async fn promote(&self, force: bool) -> Result<(), VolumeError> {
        let (reply, rx) = oneshot::channel();
        self.send(Input::Promote { force, reply })?;
        rx.await.map_err(|_| VolumeError::Detached)?
    }

    /// Makes this node secondary.
    pub async fn demote(&self) -> Result<(), VolumeError> {
        let (reply, rx) = oneshot::channel();
        self.send(Input::Demote { reply })?;
        rx.await.map_err(|_| VolumeError::Detached)?
    }

    /// Current status.
    pub async fn status(&self) -> Result<VolumeStatus, VolumeError> {
        let (reply, rx) = oneshot::channel();
        self.send(Input::Status { reply })?;
        rx.await.map_err(|_| VolumeError::Detached)
    }

    /// Starts an online verify against the peer.
    pub async fn verify(&self) -> Result<(), VolumeError> {
        let (reply, rx) = oneshot::channel();
        self.send(Input::Verify { reply })?;
        rx.await.map_err(|_| VolumeError::Detached)?
    }

    /// Resyncs chunks marked out of sync; `checksum` sends only chunks whose
    /// digests differ. Returns false when nothing was marked.
    pub async fn resync(&self, checksum: bool) -> Result<bool, VolumeError> {
        let (reply, rx) = oneshot::channel();
        self.send(Input::Resync { checksum, reply })?;
        rx.await.map_err(|_| VolumeError::Detached)?
    }

    /// Split-brain resolution: discards this node's copy; the peer then
    /// overwrites it with a full resync.
    pub async fn discard_local(&self) -> Result<(), VolumeError> {
        let (reply, rx) = oneshot::channel();
        self.send(Input::DiscardLocal { reply })?;
        rx.await.map_err(|_| VolumeError::Detached)?
    }

    /// Detaches the volume (demotes first; refuses while busy).
    pub async fn detach(&self) -> Result<(), VolumeError> {
        // A primary steps down first as `demote` does, telling the peer and
        // the witness, so that the other node can take over at once.
        if self.status().await?.engine.role == crate::engine::Role::Primary {
            self.demote().await?;
        }
        let (reply, rx) = oneshot::channel();
        self.send(Input::Detach { reply })?;
        rx.await.map_err(|_| VolumeError::Detached)?
    }

    /// The link to the peer came up or went down.
    pub fn connection_changed(&self, conn: Option<Arc<PeerConnection>>) {
        let _ = self.send(match conn {
            Some(c) => Input::Connected(c),
            None => Input::Disconnected,
        });
    }

    /// A state message from the peer arrived on connection `conn_id`.
    pub fn peer_state(&self, conn_id: u64, msg: VolumeStateMsg) {
        let _ = self.send(Input::PeerState(conn_id, msg));
    }

    /// A replication request from the peer arrived. Gives the request back
    /// when the volume is gone, so the caller can refuse it.
    pub fn replica_request(
        &self,
        conn: Arc<PeerConnection>,
        req: InboundRequest,
    ) -> Result<(), InboundRequest> {
        match self.inner.tx.send(Input::Replica(conn, req)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::SendError(Input::Replica(_, r))) => Err(r),
            Err(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroes_pieces_cover_the_range_in_aligned_pieces_the_log_holds() {
        let al = crate::meta::activity_log::ActivityLog::new(
            crate::meta::activity_log::DEFAULT_AL_EXTENT_BYTES,
            crate::meta::activity_log::AL_EXTENTS_MIN,
        );
        for (offset, len) in [
            (0, 4 << 30),
            (4096, (4 << 30) - 8192),
            (123 << 20, 1),
            (0, 0),
        ] {
            let mut at = offset;
            for p in zeroes_pieces(offset, len) {
                assert_eq!(p.offset, at, "pieces are contiguous");
                assert!(p.len > 0 && p.len <= ZEROES_PIECE_BYTES);
                assert!(al.can_hold(p.offset, p.len), "{p:?}");
                at += p.len;
            }
            assert_eq!(at, offset + len, "pieces cover the range");
        }
    }
}
