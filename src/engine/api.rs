//! What the shell sees of the engine: the actions it carries out, the
//! notices it reports, the configuration, the status snapshot, the error
//! enums, and the resync constants both sides use.

use super::{NodeView, Op, Range, Relation, RequestId, Role};
use crate::meta::activity_log::AlSnapshot;
use crate::meta::bitmap::BITMAP_PAGE_BYTES;
use crate::meta::{DiskState, Generations};
use crate::quorum::{NoQuorumPolicy, RecordView, WitnessOp};

/// Resync (and verify) requests in flight at once, at most. A resync
/// request carries one chunk, or while the application is idle a run of
/// adjacent chunks (`RESYNC_RUN_MAX_BYTES`); a verify request one chunk.
pub const RESYNC_WINDOW: usize = 32;
/// Resync requests in flight while application writes are running (one
/// chunk each then): little resync data queues in front of them on the
/// link and the disks.
pub const RESYNC_WINDOW_BUSY: usize = 4;
/// While the application is idle, adjacent dirty chunks travel together in
/// requests of up to this many bytes (fewer, larger requests: less work per
/// byte on both nodes); with application writes running, one chunk each.
pub const RESYNC_RUN_MAX_BYTES: u64 = 1 << 20;
/// The target writes resync data without FUA; the source asks it to flush
/// after this many bytes (and at the end of a pass) and only then stops
/// tracking the chunks the flush covers, persisting that: an acknowledged
/// chunk cannot be lost in a power cut of the target while the source
/// thinks it copied it, and an interrupted resync resumes from there.
pub const RESYNC_FLUSH_EVERY_BYTES: u64 = 2 << 20;

/// Writes forwarded by the peer (a primary on a copy this node resyncs)
/// held at once; more are refused, and the peer sends them again later.
pub const FORWARDED_WRITES_MAX: usize = 256;

/// The place of one metadata write in the engine's sequence
/// (`Action::PersistMeta`). The shell writes them in this order and reports
/// each with `Engine::meta_persisted`; a token is durable once it or a later
/// one was reported. The first token is 1; "none" is `Option::None`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MetaToken(std::num::NonZeroU64);

impl MetaToken {
    /// The token after this one.
    pub(super) fn next(last: Option<MetaToken>) -> MetaToken {
        MetaToken(std::num::NonZeroU64::MIN.saturating_add(last.map_or(0, |t| t.0.get())))
    }

    /// The sequence number (for logs).
    pub fn get(self) -> u64 {
        self.0.get()
    }

    /// A token built from its sequence number (tests of the metadata
    /// writer); None for 0.
    pub fn from_seq(n: u64) -> Option<MetaToken> {
        std::num::NonZeroU64::new(n).map(MetaToken)
    }
}

impl std::fmt::Display for MetaToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IoFailure {
    /// No reachable copy could serve it (local disk failed and no peer).
    #[error("no usable copy of the data: local disk failed and the peer is unreachable")]
    NoCopy,
    /// This node is not primary.
    #[error("volume is not primary on this node")]
    NotPrimary,
    /// Neither the peer nor the witness could be reached (rule 2) and the
    /// policy is `io-error`, or this node lost the primary role.
    #[error("no quorum: neither the peer nor the witness confirms this write")]
    NoQuorum,
    /// A write or zeroing spans more extents than the activity log holds,
    /// so it could never be admitted (the volume handle splits zeroing
    /// into pieces that fit; nothing else may be this long).
    #[error("request spans more activity-log extents than the log holds")]
    TooLarge,
}

/// Why a promotion was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PromoteError {
    /// The connected peer is primary.
    #[error("peer still primary: demote it first")]
    PeerPrimary,
    /// This copy may lack acknowledged writes.
    #[error("{}", not_up_to_date_text(*disk, *missing_bytes))]
    NotUpToDate {
        /// The local disk state (Outdated or Inconsistent).
        disk: DiskState,
        /// What the interrupted resync still had to copy into this copy
        /// when its source was last heard from (None: not known here).
        missing_bytes: Option<u64>,
    },
    /// No local disk.
    #[error("no local disk")]
    Diskless,
    /// The node is receiving a resync and its source cannot serve it.
    #[error(
        "a resync to this node is in progress and its source is not up to date and connected to serve reads; wait for the resync to finish"
    )]
    SyncTarget,
    /// This copy lost power with writes no flush covered.
    #[error(
        "this node lost power (it was not shut down cleanly and the machine has rebooted since), so its disk may have dropped writes the peer acknowledged and still holds. Start the peer: it resyncs what this copy may lack, then promotion is safe. {FORCE_COST}"
    )]
    CacheLost,
    /// The witness does not list this node as up to date.
    #[error(
        "outdated: the witness does not list this node as up to date: the peer wrote without it, so this copy lacks acknowledged writes. Bring the peer back (it resyncs this copy, then promotion is safe). {FORCE_COST}"
    )]
    Outdated,
    /// The witness record was forced and this promotion is not.
    #[error(
        "the witness record was forced: an operator promoted a copy not known to be complete, and until both copies are in sync again (or `resolve` ended the split brain and the resync finished) a promotion needs --force. {FORCE_COST}"
    )]
    ForcedRecord,
    /// The witness could not be asked or is still learning.
    #[error("no quorum: {0}")]
    NoQuorum(String),
    /// The old primary may still hold a lease.
    #[error("peer still primary: {0}")]
    PeerLease(String),
}

/// What `promote --force` on an incomplete copy costs, for error texts.
const FORCE_COST: &str = "Only if the other copy is lost for good: `promote --force` makes this copy the writer anyway; whatever it lacks is then missing from the volume, and if the other copy returns, both refuse to sync (split brain) until `blkrep resolve VOL --discard-local` on one node picks the copy whose changes are thrown away";

fn not_up_to_date_text(disk: DiskState, missing_bytes: Option<u64>) -> String {
    match (disk, missing_bytes) {
        (DiskState::Inconsistent, Some(b)) => format!(
            "local data is Inconsistent: a resync into this copy did not finish and its source is not connected; this copy lacked up to {} of the source's data (acknowledged writes among it) by the source's last report. Bring the source back: the resync resumes, and promotion is safe once it finished (or, with the source connected, at once). {FORCE_COST}",
            crate::units::format_bytes(b)
        ),
        (DiskState::Inconsistent, None) => format!(
            "local data is Inconsistent: a resync into this copy did not finish (or never started) and its source is not connected, so this copy lacks acknowledged writes. Bring the source back: the resync resumes, and promotion is safe once it finished (or, with the source connected, at once). {FORCE_COST}"
        ),
        (d, _) => format!(
            "local data is {d:?}: the peer wrote without this copy, so it lacks acknowledged writes. Bring the peer back: it resyncs this copy, then promotion is safe. {FORCE_COST}"
        ),
    }
}

/// Why a verify or resync request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MaintenanceError {
    /// Not connected in sync with the peer.
    #[error("the peer is not connected and in sync (relation: {0})")]
    NotInSync(&'static str),
    /// The peer is primary: its copy is the authoritative one.
    #[error("the peer is primary: run this on the primary")]
    PeerPrimary,
    /// A verify is already running.
    #[error("a verify is already running")]
    Busy,
    /// The operation would discard the data of the primary.
    #[error("this node is primary: demote it first")]
    IsPrimary,
}

/// Why a demotion was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DemoteError {
    /// Client requests are still in flight.
    #[error("{0} requests still in flight; stop the application first")]
    Busy(usize),
    /// Completed writes are being flushed on both copies first (a power
    /// cut of the demoted node must not lose what the new primary lacks
    /// marks for); the caller retries.
    #[error("flushing {0} completed writes on both copies first")]
    Flushing(usize),
}

/// What the shell must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Issue `op` on the local disk.
    LocalIo {
        /// Request.
        id: RequestId,
        /// Operation (Write, Zeroes, Flush).
        op: Op,
        /// Range.
        range: Range,
    },
    /// Send `op` to the peer and report `peer_done`.
    PeerIo {
        /// Request.
        id: RequestId,
        /// Operation.
        op: Op,
        /// Range.
        range: Range,
        /// The write is not on this node's disk: the peer is the sync
        /// source of this primary and must track it for the resync (and
        /// refuse it when it no longer runs one).
        forward: bool,
    },
    /// Read `range` locally, send it to the peer as resync data, and report
    /// `peer_done` for `id`.
    ResyncChunk {
        /// Internal request id.
        id: RequestId,
        /// The chunk.
        range: Range,
    },
    /// Hash `range` locally, ask the peer for its digest of the same range,
    /// and report `verify_done` for `id`.
    VerifyChunk {
        /// Internal request id.
        id: RequestId,
        /// The chunk.
        range: Range,
    },
    /// Complete a client request.
    Complete {
        /// Request.
        id: RequestId,
        /// Outcome.
        result: Result<(), IoFailure>,
    },
    /// Durably write these bitmap pages, then the superblock fields, then
    /// report `meta_persisted(token)`.
    PersistMeta {
        /// Its place in the metadata sequence.
        token: MetaToken,
        /// Disk state to record.
        disk: DiskState,
        /// Generations to record.
        generations: Generations,
        /// Role to record.
        primary: bool,
        /// Bitmap pages (index, bytes) to write first.
        pages: Vec<(u32, Box<[u8; BITMAP_PAGE_BYTES]>)>,
        /// A new activity-log snapshot to write, if the set changed.
        activity_log: Option<AlSnapshot>,
        /// The witness record as last seen.
        record: RecordView,
        /// This copy lost power and has not synced since (see
        /// `Engine::power_lost`).
        cache_lost: bool,
        /// Flush the data disk before writing (a new generation starts).
        flush_data: bool,
    },
    /// Send this node's current `NodeView` to the peer.
    AnnounceState,
    /// Tell the peer the resync finished, with the source's generations.
    SendSyncDone {
        /// Source generations.
        generations: Generations,
    },
    /// Start (true) or stop (false) exporting the volume to applications.
    Export(bool),
    /// Ask the witness for `op` on this volume's record (compare-and-set on
    /// `expected_epoch`) and report `witness_change_done`.
    WitnessChange {
        /// The change.
        op: WitnessOp,
        /// The epoch this node last saw.
        expected_epoch: u64,
    },
    /// Something an operator should hear about.
    Notify(Notice),
}

/// Notable events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notice {
    /// The local disk failed and was detached.
    LocalDiskFailed,
    /// The peer dropped out of the up-to-date set; writes go on without it.
    PeerOutdated,
    /// Histories diverged.
    SplitBrain,
    /// A resync started (this node is the source).
    ResyncStarted,
    /// A resync finished.
    ResyncDone,
    /// Connected but refused (reason).
    PeerRefused(&'static str),
    /// An online verify finished.
    VerifyDone,
    /// Writes wait (or fail) because neither peer nor witness answers.
    QuorumLost,
    /// The witness answers again.
    QuorumRegained,
    /// The witness names the peer primary: this node stopped being primary.
    Fenced,
    /// The witness no longer lists this node as up to date.
    Outdated,
}

/// Static parameters of one engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Usable data size.
    pub data_bytes: u64,
    /// Bytes per bitmap bit.
    pub chunk_bytes: u64,
    /// This node wins ties between equal peers (true on exactly one node).
    pub tie_winner: bool,
    /// Bytes per activity-log extent.
    pub al_extent_bytes: u64,
    /// Extents kept in the activity log.
    pub al_extents: usize,
    /// With a witness: what to do when quorum is lost (None: no witness,
    /// two-node mode; the primary writes on alone when the peer is gone).
    pub quorum: Option<NoQuorumPolicy>,
    /// This node's disk may lose completed writes in a power cut until a
    /// flush covers them (the default). False only for a disk declared
    /// power-loss protected (or reported write-through by the kernel):
    /// then a completed write counts as durable and no flush is waited for.
    pub volatile_cache: bool,
    /// Client requests the shell lets into the engine at once (its request
    /// permits). With the resync and verify windows and
    /// `FORWARDED_WRITES_MAX` it bounds the request table.
    pub client_requests_max: usize,
}

/// Progress of a resync in which this node is the source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResyncProgress {
    /// Next chunk to look at.
    pub cursor: u64,
    /// Requests in flight (each one chunk or a run of them, see
    /// `RESYNC_WINDOW`).
    pub inflight: usize,
    /// Chunks to copy when it started (dirty bits).
    pub total_chunks: u64,
    /// Chunks copied.
    pub done_chunks: u64,
}

/// Progress of an online verify run by this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyProgress {
    /// Next chunk to look at.
    pub cursor: u64,
    /// Chunks in flight.
    pub inflight: usize,
    /// Chunks compared so far.
    pub checked_chunks: u64,
    /// Chunks in the volume.
    pub total_chunks: u64,
    /// Chunks whose digests differed (now marked out of sync).
    pub mismatched_chunks: u64,
    /// The first differing regions as `(first chunk, count)` runs.
    pub mismatches: Vec<(u64, u64)>,
    /// Stopped early (link lost).
    pub aborted: bool,
}

/// Snapshot for `status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineStatus {
    /// Role.
    pub role: Role,
    /// Local disk state.
    pub disk: DiskState,
    /// Peer view when connected.
    pub peer: Option<NodeView>,
    /// Relation to the peer when connected.
    pub relation: Option<Relation>,
    /// Generations.
    pub generations: Generations,
    /// Out-of-sync bytes according to the bitmap.
    pub out_of_sync_bytes: u64,
    /// Client requests in flight.
    pub inflight_requests: usize,
    /// Resync progress when this node is the source.
    pub resync: Option<ResyncProgress>,
    /// The last finished resync this node was the source of.
    pub last_resync: Option<ResyncProgress>,
    /// A running online verify.
    pub verify: Option<VerifyProgress>,
    /// The last finished (or aborted) online verify.
    pub last_verify: Option<VerifyProgress>,
    /// Activity-log updates written since attach (metadata cost of writes).
    pub activity_log_updates: u64,
    /// The witness record as last seen.
    pub record: RecordView,
    /// Writes waiting for quorum (rule 2).
    pub quorum_waiting: usize,
    /// Requests held back because this primary's copy is still being
    /// resynced and its sync source is not reachable (I/O is frozen).
    pub frozen_requests: usize,
    /// The last witness change failed and writes wait for it.
    pub quorum_lost: bool,
    /// Completed writes not yet covered by a flush on every copy.
    pub unflushed_writes: usize,
    /// This copy lost power and has not synced with its peer since.
    pub cache_lost: bool,
}

/// Where reads are served from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadPath {
    /// The local disk.
    Local,
    /// The peer (this node is diskless).
    Peer,
    /// Nowhere: not primary, or no usable copy.
    Refuse,
}
