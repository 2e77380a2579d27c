//! The replication engine of one volume: a deterministic state machine with
//! no I/O of its own. The shell (`crate::volume`) feeds it events (requests,
//! I/O completions, peer state) and carries out the actions it emits (issue a
//! local or peer I/O, persist metadata, complete a request, announce state).
//! Same inputs, same outputs: the simulator in `tests/` drives it with seeded
//! faults.
//!
//! Where each event is handled:
//!
//! | event | entry point | code |
//! |---|---|---|
//! | client request | `submit`, `submit_forwarded` | this file (write path, legs), `request` (table, overlaps) |
//! | local or peer I/O done | `local_done`, `peer_done` | this file; resync chunks and flushes: `sync_source`; the "sync done" flush: `sync_target` |
//! | metadata durable | `meta_persisted` | this file; unflushed writes: `durability` |
//! | peer state | `peer_state` → `renegotiate` | `peer::negotiate` (generations), `witness_direction` (the record), this file |
//! | link lost | `peer_disconnected` | this file, `SyncSource::on_disconnect`, `SyncTarget::on_disconnect` |
//! | resync finished | `peer_sync_done` | `sync_target` |
//! | witness | `witness_record`, `witness_change_done` | this file (rules 2 and 3) |
//! | timer | `tick` | this file, `durability` |
//! | operator | `promote`, `demote`, `discard_local`, `start_verify`, `request_resync` | this file |
//!
//! `check_invariants` (`invariants`) runs at the end of every mutator in
//! debug builds.

pub mod durability;
mod invariants;
pub mod peer;
pub mod request;
mod sync_source;
mod sync_target;

use std::collections::{BTreeSet, VecDeque};

pub use peer::{NodeView, Relation, Role, negotiate};
pub use request::{INTERNAL_ID_BASE, Leg, Op, Range, Request, RequestId, RequestTable};

use crate::meta::activity_log::{ActivityLog, AlSnapshot};
use crate::meta::bitmap::BITMAP_PAGE_BYTES;
use crate::meta::{Bitmap, DiskState, Generations};
use crate::quorum::{Holder, NoQuorumPolicy, RecordView, WitnessOp};
use durability::{Unflushed, UnflushedWrite};
use sync_source::SyncSource;
use sync_target::SyncTarget;

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
        /// Sequence token.
        token: u64,
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

/// Mismatch runs kept for the report.
const VERIFY_REPORT_RUNS_MAX: usize = 64;

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

/// The engine.
pub struct Engine {
    cfg: EngineConfig,
    role: Role,
    disk: DiskState,
    gens: Generations,
    bitmap: Bitmap,
    peer: Option<(NodeView, Relation)>,
    /// This node as the sync source of its peer (see `sync_source`).
    source: SyncSource,
    table: RequestTable,
    actions: VecDeque<Action>,
    meta_issued: u64,
    meta_persisted: u64,
    pages_to_persist: BTreeSet<u32>,
    rng: u64,
    next_internal: RequestId,
    announce_after: Option<u64>,
    export_after: Option<u64>,
    /// Disk state and generations as last made durable: what the peer is
    /// told (it must never act on a state this node could forget in a crash).
    durable: (DiskState, Generations),
    pending_durable: VecDeque<(u64, DiskState, Generations)>,
    replicating: bool,
    al: ActivityLog,
    al_to_persist: Option<AlSnapshot>,
    al_token: u64,
    al_waiting: VecDeque<RequestId>,
    peer_dirty: Option<Vec<(u64, u64)>>,
    last_resync: Option<ResyncProgress>,
    verify: Option<VerifyProgress>,
    last_verify: Option<VerifyProgress>,
    record: RecordView,
    witness_pending: bool,
    witness_backoff: bool,
    quorum_waiters: BTreeSet<RequestId>,
    quorum_lost: bool,
    /// Requests of a primary on a copy still being resynced, held back
    /// while its sync source is unreachable (or refused them).
    frozen: BTreeSet<RequestId>,
    /// This node as the sync target of its peer (see `sync_target`).
    target: SyncTarget,
    /// Finished writes not yet durable on every copy that has them, in
    /// epochs closed by flushes; each keeps its activity-log pin.
    unflushed: Unflushed,
    /// The flush this engine issued on its own (bounds, activity-log
    /// pressure, age, demotion), while in flight.
    engine_flush: Option<RequestId>,
    /// Ticks in a row that saw finished writes waiting for a flush.
    unflushed_ticks: u32,
    /// A flush is wanted as soon as none is in flight (demotion).
    flush_wanted: bool,
    /// This copy lost power with writes no flush covered and has not
    /// synced with its peer since: it may lack writes the peer still
    /// holds. Meaningful while UpToDate; persisted.
    cache_lost: bool,
    /// The next metadata write flushes the data disk first (see
    /// `start_tracking`).
    meta_flush_data: bool,
}

impl Engine {
    /// An engine for a volume whose metadata says `disk`, `gens`, `primary`,
    /// with its persisted `bitmap`. `seed` feeds generation identifiers.
    pub fn new(
        cfg: EngineConfig,
        disk: DiskState,
        gens: Generations,
        bitmap: Bitmap,
        seed: u64,
    ) -> Self {
        let cfg_al = (cfg.al_extent_bytes, cfg.al_extents);
        Engine {
            cfg,
            role: Role::Secondary,
            disk,
            gens,
            bitmap,
            peer: None,
            source: SyncSource::default(),
            target: SyncTarget::default(),
            table: RequestTable::default(),
            actions: VecDeque::new(),
            meta_issued: 0,
            meta_persisted: 0,
            pages_to_persist: BTreeSet::new(),
            rng: seed,
            next_internal: INTERNAL_ID_BASE,
            announce_after: None,
            export_after: None,
            durable: (disk, gens),
            pending_durable: VecDeque::new(),
            replicating: false,
            al: ActivityLog::new(cfg_al.0, cfg_al.1),
            al_to_persist: None,
            al_token: 0,
            al_waiting: VecDeque::new(),
            peer_dirty: None,
            last_resync: None,
            verify: None,
            last_verify: None,
            record: RecordView::default(),
            witness_pending: false,
            witness_backoff: false,
            quorum_waiters: BTreeSet::new(),
            quorum_lost: false,
            frozen: BTreeSet::new(),
            unflushed: Unflushed::default(),
            engine_flush: None,
            unflushed_ticks: 0,
            flush_wanted: false,
            cache_lost: false,
            meta_flush_data: false,
        }
    }

    /// The persisted "lost power" mark, as read at attach (no write).
    pub fn set_cache_lost(&mut self, lost: bool) {
        self.cache_lost = lost && self.disk == DiskState::UpToDate;
    }

    /// The shell found at attach that this node lost power since its last
    /// unclean stop (the machine rebooted): completed writes that no flush
    /// covered may be gone from this disk. An up-to-date copy then may lack
    /// writes the peer acknowledged; it says so until it synced. Called
    /// before any other event; the shell records the mark (`status()
    /// .cache_lost`) in the superblock it writes at attach, and every
    /// metadata write carries it from then on.
    pub fn power_lost(&mut self) {
        assert!(
            self.actions.is_empty(),
            "power_lost comes before any other event"
        );
        if self.cfg.volatile_cache && self.disk == DiskState::UpToDate {
            self.cache_lost = true;
        }
    }

    /// When the witness record says exactly one side holds every
    /// acknowledged write, that side is the resync source, whatever the
    /// generations say: the other side never completed a write of its own
    /// (rule 2), so overwriting its extra data loses nothing acknowledged.
    /// Bitmap-based when the generations allow it, else a full sync.
    ///
    /// Never across a forced promotion: when the two lineages were split by
    /// one (`Generations::forced_apart`), the record names the forced copy
    /// because the operator insisted, not because it holds every
    /// acknowledged write, so diverged histories stay a split brain until
    /// `resolve` picks the victim (rule 4).
    fn witness_direction(&self, view: &NodeView, negotiated: Relation) -> Option<Relation> {
        let rec = self.record;
        if self.cfg.quorum.is_none() || rec.epoch == 0 {
            return None;
        }
        // (A record written by a forced promotion is no such proof either,
        // whatever the peer announced so far: its forced state may not be
        // durable, and so not announced, yet.)
        if rec.forced
            || (negotiated == Relation::Diverged && self.gens.forced_apart(&view.generations))
        {
            return None;
        }
        // One copy lost power and the generations are the same: the record
        // may name it alone (an outdate that landed late, or before it
        // lost writes the other holds), but the copy that kept power holds
        // every acknowledged write (see `negotiate`).
        let kept_power_unmarked = if self.cache_lost {
            view.dirty_chunks == 0
        } else {
            self.bitmap.set_count() == 0
        };
        if self.cache_lost != view.cache_lost
            && kept_power_unmarked
            && self.gens.compare(&view.generations) == crate::meta::SyncDecision::InSync
            && self.disk != DiskState::Inconsistent
            && view.disk != DiskState::Inconsistent
        {
            return None;
        }
        // A copy left Inconsistent by an interrupted resync is finished
        // from the only consistent copy (it had no writes of its own since,
        // or the resync into it would not have started).
        if matches!(negotiated, Relation::Diverged | Relation::Refused(_)) {
            let consistent = |d: DiskState| matches!(d, DiskState::UpToDate | DiskState::Outdated);
            // (An Inconsistent primary forwards its I/O to its sync source.)
            if consistent(self.disk) && view.disk == DiskState::Inconsistent {
                return Some(Relation::SyncSource {
                    target_ready: false,
                    full: true,
                });
            }
            if consistent(view.disk) && self.disk == DiskState::Inconsistent {
                return Some(Relation::SyncTarget);
            }
        }
        if negotiated == Relation::Diverged
            && rec.me_up_to_date
            && rec.peer_up_to_date
            && self.disk == DiskState::UpToDate
            && view.disk == DiskState::UpToDate
        {
            // Both hold every acknowledged write (neither outdated the
            // other, so neither completed a write alone): the histories
            // differ only in unacknowledged writes. Either copy will do,
            // but a copy that lost power may lack writes the other holds:
            // the one that kept power is the source. (That mark is durable
            // and the same in both views, so both sides decide alike; roles
            // may change between the two decisions, a fenced primary's
            // does.)
            let me_wins = match (self.cache_lost, view.cache_lost, self.role, view.role) {
                (false, true, ..) => true,
                (true, false, ..) => false,
                (_, _, Role::Primary, _) => true,
                (_, _, _, Role::Primary) => false,
                _ => self.cfg.tie_winner,
            };
            if !me_wins {
                return (self.role == Role::Secondary).then_some(Relation::SyncTarget);
            }
            let same_base = self.gens.bitmap != 0 && self.gens.bitmap == view.generations.bitmap;
            return Some(Relation::SyncSource {
                target_ready: false,
                full: !(same_base && (self.peer_dirty.is_some() || view.dirty_chunks == 0)),
            });
        }
        if rec.me_up_to_date == rec.peer_up_to_date {
            return None;
        }
        // Never the target of a copy the witness outdated, never the source
        // when outdated (its disk state may just not say so yet).
        // Exception: a copy left Inconsistent by an interrupted resync from
        // the other one is finished from it (it never completed a write of
        // its own since, or its generations would have refused the resync).
        if rec.me_up_to_date
            && negotiated == Relation::SyncTarget
            && self.disk != DiskState::Inconsistent
        {
            return Some(Relation::Refused(
                "the peer is outdated at the witness; waiting for it to learn that",
            ));
        }
        if !rec.me_up_to_date
            && matches!(negotiated, Relation::SyncSource { .. })
            && view.disk != DiskState::Inconsistent
        {
            return Some(Relation::Refused("this node is outdated at the witness"));
        }
        if !rec.me_up_to_date
            && view.disk == DiskState::UpToDate
            && self.disk != DiskState::UpToDate
            && self.disk != DiskState::Diskless
            && self.role == Role::Secondary
        {
            // The peer's state predates this record: it may be changing
            // already (into our sync target, on the record it knew), and
            // a copy outdated by this record that became the target of a
            // copy now Inconsistent waits for good. It adopts the record
            // from our next state, announces, and we decide on that.
            if negotiated == Relation::SyncTarget {
                return None;
            }
            if view.record.epoch < rec.epoch {
                return Some(Relation::Refused(
                    "waiting for the peer to learn the witness record",
                ));
            }
            return Some(Relation::SyncTarget);
        }
        if rec.me_up_to_date
            && self.disk == DiskState::UpToDate
            && view.disk != DiskState::UpToDate
            && view.disk != DiskState::Diskless
            && view.role == Role::Secondary
        {
            if matches!(negotiated, Relation::SyncSource { .. }) {
                return None;
            }
            let bitmap_ok = matches!(
                self.gens.compare(&view.generations),
                crate::meta::SyncDecision::LocalAheadBitmap
                    | crate::meta::SyncDecision::PeerAheadBitmap
                    | crate::meta::SyncDecision::InSync
            ) && (self.peer_dirty.is_some() || view.dirty_chunks == 0);
            return Some(Relation::SyncSource {
                target_ready: false,
                full: !bitmap_ok,
            });
        }
        None
    }

    /// Sets the witness record persisted in the superblock (at attach).
    pub fn set_record(&mut self, record: RecordView) {
        self.record = record;
    }

    /// The dirty chunks of this node as `(first, count)` runs, for the peer;
    /// None when there are more than `max_runs` (the peer then falls back to a
    /// full resync).
    pub fn dirty_runs(&self, max_runs: usize) -> Option<Vec<(u64, u64)>> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut at = 0;
        while let Some(c) = self.bitmap.next_set(at) {
            match runs.last_mut() {
                Some((first, count)) if *first + *count == c => *count += 1,
                _ => {
                    if runs.len() == max_runs {
                        return None;
                    }
                    runs.push((c, 1));
                }
            }
            at = c + 1;
        }
        Some(runs)
    }

    /// The peer's dirty chunks arrived with its state (call before
    /// `peer_state`); None: it has too many to list.
    pub fn peer_dirty_runs(&mut self, runs: Option<Vec<(u64, u64)>>) {
        let chunks = self.bitmap.chunks();
        self.peer_dirty = runs.map(|r| {
            r.into_iter()
                .filter(|(first, _)| *first < chunks)
                .map(|(first, count)| (first, count.min(chunks - first)))
                .collect()
        });
    }

    /// After a crash of this node while it was primary: every extent of the
    /// persisted activity log may differ from the peer. Marks them out of
    /// sync and persists that. `al_seq` continues the on-disk numbering.
    pub fn recover_activity_log(&mut self, extents: &[u32], extent_bytes: u64, al_seq: u64) -> u64 {
        for e in extents {
            let pages = self
                .bitmap
                .set_range(u64::from(*e) * extent_bytes, extent_bytes);
            self.pages_to_persist.extend(pages);
        }
        self.al.set_seq(al_seq + 1);
        // Persist an empty log too: these extents now live in the bitmap.
        self.al_to_persist = Some(self.al.snapshot());
        let token = self.persist();
        self.check_invariants();
        token
    }

    /// After a clean attach: the activity log's numbering continues after
    /// `al_seq`, the newest snapshot on disk.
    pub fn continue_activity_log(&mut self, al_seq: u64) {
        self.al.set_seq(al_seq);
    }

    /// Activity-log snapshots written so far (metadata cost).
    pub fn activity_log_updates(&self) -> u64 {
        self.al.updates
    }

    /// Marks every chunk out of sync (recovery after this node crashed while
    /// primary: any region may differ from the peer) and persists that.
    pub fn mark_all_out_of_sync(&mut self) -> u64 {
        let pages = self.bitmap.set_all();
        self.pages_to_persist.extend(pages);
        let token = self.persist();
        self.check_invariants();
        token
    }

    /// Sets how many resync requests may be in flight
    /// (1..=`RESYNC_WINDOW`): the shell lowers it while application writes
    /// run, so that they do not queue behind resync data, and raises it when
    /// they stop. Returns whether it changed (then new actions may be
    /// queued).
    pub fn set_resync_window(&mut self, requests: usize) -> bool {
        let requests = requests.clamp(1, RESYNC_WINDOW);
        if requests == self.source.window {
            return false;
        }
        self.source.window = requests;
        self.pump_resync();
        self.after_event();
        true
    }

    /// The next action for the shell, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// This node's view as the peer is told: disk state and generations
    /// as durable on disk (announced again whenever that changes).
    pub fn announced_view(&self) -> NodeView {
        let mut v = self.view();
        if self.disk != DiskState::Diskless {
            // The less trusted of live and durable disk state: a copy is
            // announced up to date only when that survives a crash, and a
            // copy becoming a sync target says so at once.
            let rank = |d: DiskState| match d {
                DiskState::UpToDate => 3,
                DiskState::Outdated => 2,
                DiskState::Inconsistent => 1,
                DiskState::Diskless => 0,
            };
            if rank(self.durable.0) < rank(self.disk) {
                v.disk = self.durable.0;
            }
            // A forced history is announced at once, durable or not: the
            // older generations no longer describe this copy, and a peer
            // that took them (with this node primary) could decide to
            // become its sync target. Early is harmless: the forced
            // generations can only make the peer refuse, and after a crash
            // before they are durable the older ones are announced again.
            if self.gens.forced == self.durable.1.forced {
                v.generations = self.durable.1;
            }
        }
        v
    }

    /// This node's live view (what it negotiates with).
    pub fn view(&self) -> NodeView {
        NodeView {
            role: self.role,
            disk: self.disk,
            generations: self.gens,
            data_bytes: self.cfg.data_bytes,
            chunk_bytes: self.cfg.chunk_bytes,
            dirty_chunks: self.bitmap.set_count(),
            // Ready only once its own client writes (of a fenced primary)
            // have landed: none may land after resync data.
            sync_target: matches!(self.peer, Some((_, Relation::SyncTarget)))
                && self.announce_after.is_none()
                && !self.has_local_client_writes(),
            full_sync_base: self.full_sync_base(),
            record: self.record,
            cache_lost: self.cache_lost,
            volatile_cache: self.cfg.volatile_cache,
        }
    }

    /// The base generation of a running full sync from this node once the
    /// bitmap marking every chunk is durable (0 otherwise).
    fn full_sync_base(&self) -> u64 {
        let full = matches!(
            self.peer,
            Some((_, Relation::SyncSource { full: true, .. }))
        );
        if full
            && self.source.pass.is_some()
            && self.source.full_sync_token != 0
            && self.source.full_sync_token <= self.meta_persisted
        {
            self.durable.1.bitmap
        } else {
            0
        }
    }

    /// As the target of a full sync whose source durably marked every chunk
    /// under `base`: take `base` as this copy's generation. Chunks copied so
    /// far are then equal to the source's at `base` and the rest is marked
    /// there, so after an interruption (link, either node's crash) the
    /// generations call for a bitmap resync of the remainder.
    fn adopt_full_sync_base(&mut self) {
        let Some((view, Relation::SyncTarget)) = self.peer else {
            return;
        };
        let base = view.full_sync_base;
        // (A primary on an Inconsistent copy wrote nothing to it: it
        // forwards its writes to the source.)
        if base == 0
            || self.disk != DiskState::Inconsistent
            || self.gens.current == base
            || view.generations.bitmap != base
        {
            return;
        }
        self.gens = Generations {
            current: base,
            bitmap: 0,
            history: view.generations.history,
            forced: view.generations.forced,
        };
        self.persist();
    }

    /// Status snapshot.
    pub fn status(&self) -> EngineStatus {
        EngineStatus {
            role: self.role,
            disk: self.disk,
            peer: self.peer.map(|(v, _)| v),
            relation: self.peer.map(|(_, r)| r),
            generations: self.gens,
            out_of_sync_bytes: self.bitmap.dirty_bytes(self.cfg.data_bytes),
            inflight_requests: self
                .table
                .requests
                .keys()
                .filter(|id| **id < INTERNAL_ID_BASE)
                .count(),
            resync: self.source.pass,
            last_resync: self.last_resync,
            verify: self.verify.clone(),
            last_verify: self.last_verify.clone(),
            activity_log_updates: self.al.updates,
            record: self.record,
            quorum_waiting: self.quorum_waiters.len(),
            quorum_lost: self.quorum_lost,
            frozen_requests: self.frozen.len(),
            unflushed_writes: self.unflushed.len(),
            cache_lost: self.cache_lost,
        }
    }

    /// The connected peer's announced view (cheap).
    pub fn peer_view(&self) -> Option<NodeView> {
        self.peer.map(|(v, _)| v)
    }

    /// Whether this node receives a resync now (cheap).
    pub fn is_sync_target(&self) -> bool {
        matches!(self.peer, Some((_, Relation::SyncTarget)))
    }

    /// Whether metadata up to `token` is already durable.
    pub fn meta_durable(&self, token: u64) -> bool {
        token <= self.meta_persisted
    }

    /// The role (cheap; for per-request checks).
    pub fn status_role(&self) -> Role {
        self.role
    }

    /// The local disk state (cheap; for per-request checks).
    pub fn disk(&self) -> DiskState {
        self.disk
    }

    /// Whether the connected peer announced itself primary (cheap).
    pub fn peer_is_primary(&self) -> bool {
        self.peer.is_some_and(|(v, _)| v.role == Role::Primary)
    }

    /// Whether this node is running a resync as the source (cheap).
    pub fn resync_running(&self) -> bool {
        self.source.pass.is_some()
    }

    /// Where a read should go right now.
    pub fn read_path(&self) -> ReadPath {
        if self.role != Role::Primary {
            ReadPath::Refuse
        } else if self.disk == DiskState::UpToDate {
            ReadPath::Local
        } else if (self.disk == DiskState::Diskless && self.replicating()) || self.forwarding() {
            // A forwarding primary's reads go to its sync source, or wait
            // (frozen) while the source is unreachable.
            ReadPath::Peer
        } else {
            ReadPath::Refuse
        }
    }

    /// Whether writes received from the peer (mirrored writes, resync data)
    /// may be applied here.
    pub fn accepts_peer_writes(&self) -> bool {
        (self.role == Role::Secondary || self.forwarding())
            && self.disk != DiskState::Diskless
            && matches!(
                self.peer,
                Some((
                    _,
                    Relation::InSync | Relation::SyncTarget | Relation::ServingDiskless
                ))
            )
    }

    /// Whether resync data from the peer may be applied here: as its
    /// mirrored writes may, but not once it said the resync is done. Data
    /// sent after that belongs to a pass it started on a state of this node
    /// older than the "sync done" (the link carries them in that order): it
    /// could still be in flight here when this node, done, writes on its own
    /// over the same range, and land last (seed 57801). The source keeps such
    /// a refused chunk marked and copies it in a later pass.
    pub fn accepts_resync_writes(&self) -> bool {
        self.accepts_peer_writes() && self.target.done_flush.is_none()
    }

    /// Whether reads and flushes from the peer are served here: as its
    /// mirror, or as the sync source of a primary whose own copy is still
    /// being resynced.
    pub fn serves_peer_reads(&self) -> bool {
        self.disk == DiskState::UpToDate
            && (self.accepts_peer_writes() || self.accepts_forwarded_writes())
    }

    /// Whether this node is (or just was) the sync source of a peer that
    /// may forward its writes here (applied through `submit_forwarded`).
    pub fn accepts_forwarded_writes(&self) -> bool {
        self.role == Role::Secondary
            && self.disk == DiskState::UpToDate
            && matches!(
                self.peer,
                Some((_, Relation::SyncSource { .. } | Relation::InSync))
            )
    }

    /// A write forwarded by the peer, a primary whose own copy this node is
    /// resyncing. It is serialised with the resync chunks like a client
    /// write (a chunk is read either wholly before it or after it has
    /// landed), and it completes (`Action::Complete` with the returned id:
    /// reply to the peer) once it is on this disk; the peer then writes it
    /// to its own copy. None: not the sync source now (the peer holds the
    /// write back and sends it again later).
    pub fn submit_forwarded(&mut self, op: Op, range: Range) -> Option<RequestId> {
        if !self.accepts_forwarded_writes() || !matches!(op, Op::Write { .. } | Op::Zeroes { .. }) {
            return None;
        }
        let id = self.internal_id();
        let req = Request {
            from_peer: true,
            ..Request::new(op, range)
        };
        if self.table.insert(id, req) {
            self.start(id);
        }
        self.after_event();
        Some(id)
    }

    /// Primary on a copy that is still being resynced: it forwards every
    /// read and write to its sync source and writes nothing locally.
    fn forwarding(&self) -> bool {
        self.role == Role::Primary && self.disk == DiskState::Inconsistent
    }

    /// Forwarding, and the sync source is connected and up to date.
    fn forward_ready(&self) -> bool {
        self.forwarding()
            && matches!(
                self.peer,
                Some((v, Relation::SyncTarget))
                    if v.disk == DiskState::UpToDate && v.role == Role::Secondary
            )
    }

    /// Whether a promotion now would make this node a forwarding primary
    /// (a sync target whose up-to-date source is connected).
    /// Its Inconsistent state must be durable: after a crash it must not
    /// come back as an up-to-date copy of its old data.
    pub fn promotes_by_forwarding(&self) -> bool {
        self.role == Role::Secondary
            && self.disk == DiskState::Inconsistent
            && self.durable.0 == DiskState::Inconsistent
            && matches!(
                self.peer,
                Some((v, Relation::SyncTarget))
                    if v.disk == DiskState::UpToDate && v.role == Role::Secondary
            )
    }

    /// Whether application writes are mirrored to the peer now.
    pub fn replicating(&self) -> bool {
        match &self.peer {
            Some((p, rel)) => {
                p.disk != DiskState::Diskless
                    && matches!(
                        rel,
                        Relation::InSync
                            | Relation::DisklessClient
                            | Relation::SyncSource {
                                target_ready: true,
                                ..
                            }
                    )
            }
            None => false,
        }
    }

    fn fresh_id(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(1);
        Generations::fresh_id(self.rng)
    }

    /// A new generation starts (writes this copy completes from now on are
    /// ones the peer lacks). The metadata write that records it flushes
    /// the data disk first: after a power cut this copy may then only have
    /// lost writes of the new generation, which no other copy holds; the
    /// older ones the peer may hold too are durable here, and a resync
    /// from this copy cannot undo them.
    fn start_tracking(&mut self, id: u64) {
        self.gens.start_tracking(id);
        self.meta_flush_data = true;
    }

    fn persist(&mut self) -> u64 {
        self.meta_issued += 1;
        if self.disk == DiskState::Diskless {
            // No disk to write to: nothing can wait on it.
            self.pages_to_persist.clear();
            self.al_to_persist = None;
            self.meta_persisted = self.meta_issued;
            self.pending_durable.clear();
            self.durable = (self.disk, self.gens);
            return self.meta_issued;
        }
        self.pending_durable
            .push_back((self.meta_issued, self.disk, self.gens));
        let pages = std::mem::take(&mut self.pages_to_persist)
            .into_iter()
            .map(|p| (p, Box::new(self.bitmap.page_bytes(p))))
            .collect();
        self.actions.push_back(Action::PersistMeta {
            token: self.meta_issued,
            disk: self.disk,
            generations: self.gens,
            primary: self.role == Role::Primary,
            pages,
            activity_log: self.al_to_persist.take(),
            record: self.record,
            cache_lost: self.cache_lost,
            flush_data: std::mem::take(&mut self.meta_flush_data) && self.cfg.volatile_cache,
        });
        self.meta_issued
    }

    /// Called after every event: react to the peer leaving the set of nodes
    /// that receive writes.
    fn after_event(&mut self) {
        let now = self.replicating();
        if self.replicating
            && !now
            && self.role == Role::Primary
            && self.disk == DiskState::UpToDate
        {
            let id = self.fresh_id();
            self.start_tracking(id);
            self.persist();
            self.actions.push_back(Action::Notify(Notice::PeerOutdated));
        }
        if self.replicating && !now {
            self.peer_acks_lost();
        }
        if now && !self.replicating {
            self.resend_quorum_waiters();
        }
        self.replicating = now;
        self.resume_frozen(false);
        if self.cache_lost && matches!(self.peer, Some((_, Relation::InSync))) {
            // Synced with the peer (or nothing was marked on either side):
            // this copy holds what the peer holds.
            self.cache_lost = false;
            self.persist();
        }
        self.flush_if_needed();
        self.want_witness();
        self.check_invariants();
    }

    // ---- durability of completed writes (see `durability`) ----

    /// The peer stopped receiving writes: what it acknowledged without a
    /// flush covering it may be lost in a power cut there, so it goes into
    /// the bitmap (durably, before any activity-log snapshot that could
    /// drop the extents: metadata is written in order).
    fn peer_acks_lost(&mut self) {
        let (mut marked, done) = self.unflushed.peer_lost();
        for r in self.table.requests.values_mut() {
            if r.peer == Leg::Done && r.op.volatile_write() && !r.forwarded && !r.peer_marked {
                r.peer_marked = true;
                r.needs_local_flush = true;
                marked.push(r.range);
            }
        }
        if self.disk != DiskState::Diskless && !marked.is_empty() {
            for range in marked {
                let pages = self.bitmap.set_range(range.offset, range.len);
                self.pages_to_persist.extend(pages);
            }
            self.persist();
        }
        self.release_pins(done);
    }

    /// Writes durable on every copy: their activity-log extents may go.
    fn release_pins(&mut self, writes: Vec<UnflushedWrite>) {
        if writes.is_empty() {
            return;
        }
        for w in writes {
            self.al.end(w.range.offset, w.range.len);
        }
        for waiting in std::mem::take(&mut self.al_waiting) {
            if self.table.requests.contains_key(&waiting) {
                self.start(waiting);
            }
        }
    }

    /// Issues a flush of the engine's own when finished writes wait and a
    /// bound says so: too many of them, writes waiting for an extent the
    /// unflushed ones pin, a mostly pinned activity log, their age (ticks),
    /// or a demotion.
    fn flush_if_needed(&mut self) {
        if self.engine_flush.is_some() || !self.unflushed.has_open() {
            return;
        }
        let wanted = self.flush_wanted
            || self.unflushed.open_full()
            || !self.al_waiting.is_empty()
            || self.al.mostly_busy()
            || self.unflushed_ticks >= 2;
        if !wanted {
            return;
        }
        let id = self.internal_id();
        self.table
            .insert(id, Request::new(Op::Flush, Range::new(0, 0)));
        let has_disk = self.disk != DiskState::Diskless;
        let to_peer = self.replicating() && !self.forwarding();
        if let Some(r) = self.table.requests.get_mut(&id) {
            if has_disk {
                r.local = Leg::Pending;
            }
            if to_peer {
                r.peer = Leg::Pending;
            }
        }
        if has_disk {
            self.actions.push_back(Action::LocalIo {
                id,
                op: Op::Flush,
                range: Range::new(0, 0),
            });
        }
        if to_peer {
            self.send_to_peer(id, Op::Flush, Range::new(0, 0), false);
        }
        self.unflushed.close(id);
        self.engine_flush = Some(id);
        self.flush_wanted = false;
        self.unflushed_ticks = 0;
        if !has_disk && !to_peer {
            // Nothing to flush on (no disk, no peer): what is tracked
            // cannot become more durable than it is.
            self.try_complete(id);
        }
    }

    // ---- client requests ----

    /// A client request. `Read` is only submitted when `read_path` says Peer.
    pub fn submit(&mut self, id: RequestId, op: Op, range: Range) {
        if self.role != Role::Primary {
            self.actions.push_back(Action::Complete {
                id,
                result: Err(IoFailure::NotPrimary),
            });
            return;
        }
        if self.table.insert(id, Request::new(op, range)) {
            self.start(id);
        }
        self.after_event();
    }

    fn start(&mut self, id: RequestId) {
        let replicating = self.replicating();
        let has_disk = self.disk != DiskState::Diskless;
        let Some(r) = self.table.requests.get(&id) else {
            return;
        };
        let (op, range, from_peer, pinned) = (r.op, r.range, r.from_peer, r.al_pinned);
        if op == Op::VerifyChunk {
            self.actions.push_back(Action::VerifyChunk { id, range });
            if let Some(r) = self.table.requests.get_mut(&id) {
                r.peer = Leg::Pending;
            }
            return;
        }
        if op == Op::ResyncChunk {
            self.actions.push_back(Action::ResyncChunk { id, range });
            if let Some(r) = self.table.requests.get_mut(&id) {
                r.peer = Leg::Pending;
            }
            return;
        }
        // Rule 6: the extents this write touches are in the persisted
        // activity log before either leg is issued. (A forwarding primary
        // writes locally too, once its sync source has the write. A write
        // forwarded by the peer is covered by the peer's log.)
        if matches!(op, Op::Write { .. } | Op::Zeroes { .. }) && has_disk && !from_peer {
            if !self.al.can_hold(range.offset, range.len) {
                // Waiting for room would hold the range lock forever.
                self.fail_requests(BTreeSet::from([id]), IoFailure::TooLarge);
                return;
            }
            if !pinned {
                match self.al.begin(range.offset, range.len) {
                    Ok(changed) => {
                        if let Some(r) = self.table.requests.get_mut(&id) {
                            r.al_pinned = true;
                        }
                        if let Some(snap) = changed {
                            self.al_to_persist = Some(snap);
                            self.al_token = self.persist();
                        }
                    }
                    Err(_) => {
                        // Every extent of the log is busy: wait for one to free.
                        self.al_waiting.push_back(id);
                        return;
                    }
                }
            }
            if self.al_token > self.meta_persisted {
                if let Some(r) = self.table.requests.get_mut(&id) {
                    r.start_after = self.al_token;
                }
                return;
            }
        }
        self.start_legs(id, replicating, has_disk);
    }

    fn start_legs(&mut self, id: RequestId, replicating: bool, has_disk: bool) {
        let Some(r) = self.table.requests.get(&id) else {
            return;
        };
        let (op, range, from_peer) = (r.op, r.range, r.from_peer);
        if self.forwarding() && id < INTERNAL_ID_BASE {
            return self.forward(id);
        }
        if from_peer {
            // The peer forwarded it: this disk only (the peer writes its own
            // copy once this one has it). With FUA: this copy is the only
            // complete one, and the forwarding primary completes the write
            // once it is here, so a power cut here must not lose it.
            if let Some(r) = self.table.requests.get_mut(&id) {
                r.local = Leg::Pending;
            }
            let op = op.with_fua();
            self.actions.push_back(Action::LocalIo { id, op, range });
            return;
        }
        if op == Op::Read && !replicating && self.disk == DiskState::UpToDate {
            // A read held back while this copy was being resynced; it is
            // up to date now.
            if let Some(r) = self.table.requests.get_mut(&id) {
                r.local = Leg::Pending;
            }
            self.actions.push_back(Action::LocalIo { id, op, range });
            return;
        }
        let mut token = 0;
        if op != Op::Read && op != Op::Flush && !replicating && has_disk {
            let pages = self.bitmap.set_range(range.offset, range.len);
            if !pages.is_empty() {
                self.pages_to_persist.extend(pages);
                token = self.persist();
            } else if self.meta_issued > self.meta_persisted {
                // Earlier bits (or the generation change) are still on their way.
                token = self.meta_issued;
            }
        }
        if op == Op::Flush && !replicating && has_disk && self.meta_issued > self.meta_persisted {
            // A flush that completes without the peer promises durability
            // on this copy alone: only once this copy is the newer one on
            // disk (the generation change), or after a power cut here the
            // peer's copy, which may lack what it covers, would be chosen.
            token = self.meta_issued;
        }
        // In sync again, but the witness does not list the peer yet: the
        // record names this copy alone as holding every acknowledged write,
        // so a power cut here must not lose one the peer holds too.
        let alone_at_witness = self.cfg.quorum.is_some()
            && self.record.epoch > 0
            && !self.record.peer_up_to_date
            && replicating;
        let Some(r) = self.table.requests.get_mut(&id) else {
            return;
        };
        r.meta_token = token;
        if alone_at_witness && op.volatile_write() {
            r.needs_local_flush = true;
        }
        if op != Op::Read && has_disk {
            if token != 0 {
                r.local_deferred = true;
            } else {
                r.local = Leg::Pending;
                self.actions.push_back(Action::LocalIo { id, op, range });
            }
        }
        if replicating {
            r.peer = Leg::Pending;
            self.send_to_peer(id, op, range, false);
        }
        if op == Op::Flush {
            // It covers every write finished before it was issued.
            self.unflushed.close(id);
        }
        self.try_complete(id);
    }

    /// A forwarding primary's request goes to the sync source only, or is
    /// held back (frozen) until the source is reachable again: this copy
    /// cannot serve it, and no other copy may take over (safety first).
    fn forward(&mut self, id: RequestId) {
        let ready = self.forward_ready();
        let Some(r) = self.table.requests.get_mut(&id) else {
            return;
        };
        if !ready {
            r.peer = Leg::Unused;
            self.frozen.insert(id);
            return;
        }
        self.frozen.remove(&id);
        r.peer = Leg::Pending;
        r.forwarded = true;
        let (op, range) = (r.op, r.range);
        self.send_to_peer(id, op, range, true);
        if op == Op::Flush {
            self.unflushed.close(id);
        }
    }

    /// Frozen requests proceed once they can: forwarded again when the
    /// sync source is back (`allow_forward`: only on news from the peer, so
    /// a source that refuses them is not asked again in a loop), or served
    /// as usual once this copy is up to date.
    fn resume_frozen(&mut self, allow_forward: bool) {
        if self.frozen.is_empty() {
            return;
        }
        if self.forwarding() {
            if allow_forward && self.forward_ready() {
                for id in self.frozen.clone() {
                    self.forward(id);
                }
            }
            return;
        }
        if self.role != Role::Primary || self.disk != DiskState::UpToDate {
            return;
        }
        for id in std::mem::take(&mut self.frozen) {
            if let Some(r) = self.table.requests.get_mut(&id) {
                r.local = Leg::Unused;
                r.peer = Leg::Unused;
                r.forwarded = false;
                r.meta_token = 0;
                r.local_deferred = false;
                self.start(id);
            }
        }
    }

    /// Fails every request of `ids` with `why`.
    fn fail_requests(&mut self, ids: BTreeSet<RequestId>, why: IoFailure) {
        for id in ids {
            self.actions.push_back(Action::Complete {
                id,
                result: Err(why),
            });
            self.finish(id);
        }
    }

    /// A fresh id for a request of the engine's own.
    fn internal_id(&mut self) -> RequestId {
        let id = self.next_internal;
        self.next_internal += 1;
        id
    }

    /// Sends `op` on `range` to the peer for request `id`.
    fn send_to_peer(&mut self, id: RequestId, op: Op, range: Range, forward: bool) {
        if let Some(r) = self.table.requests.get_mut(&id) {
            r.peer_issued = true;
        }
        self.actions.push_back(Action::PeerIo {
            id,
            op,
            range,
            forward,
        });
    }

    fn try_complete(&mut self, id: RequestId) {
        if self.frozen.contains(&id) {
            return;
        }
        let persisted = self.meta_persisted;
        let Some(r) = self.table.requests.get(&id) else {
            return;
        };
        if self.engine_flush == Some(id) {
            // The engine's own flush: nobody to answer.
            if r.local != Leg::Pending && r.peer != Leg::Pending {
                self.engine_flush = None;
                self.finish(id);
            }
            return;
        }
        if r.local == Leg::Pending
            || r.peer == Leg::Pending
            || r.local_deferred
            || (r.meta_token != 0 && r.meta_token > persisted)
        {
            return;
        }
        if matches!(r.op, Op::ResyncChunk | Op::VerifyChunk) {
            return; // finished in resync_chunk_finished / verify_done
        }
        if r.needs_local_flush
            && r.local == Leg::Done
            && r.op.volatile_write()
            && self.cfg.volatile_cache
        {
            // See `Request::needs_local_flush`: its local leg once more,
            // as a flush.
            if let Some(r) = self.table.requests.get_mut(&id) {
                r.needs_local_flush = false;
                r.local = Leg::Pending;
            }
            self.actions.push_back(Action::LocalIo {
                id,
                op: Op::Flush,
                range: Range::new(0, 0),
            });
            return;
        }
        let ok = r.local == Leg::Done || r.peer == Leg::Done;
        if ok && self.needs_quorum(r) && self.role == Role::Primary {
            // Rule 2: completing without the peer needs the witness to
            // have moved the peer out of up_to_date first.
            if self.quorum_lost && self.cfg.quorum == Some(NoQuorumPolicy::IoError) {
                self.quorum_waiters.remove(&id);
                self.actions.push_back(Action::Complete {
                    id,
                    result: Err(IoFailure::NoQuorum),
                });
                self.finish(id);
                return;
            }
            if !r.peer_issued && self.replicating() {
                // It started while the peer received no writes, and the peer
                // receives them again now (it came back while this request's
                // local leg ran, after `resend_quorum_waiters`): the peer,
                // not the witness, completes it. Waiting would also hold
                // back the resync chunk queued behind it.
                self.resend_to_peer(id);
                return;
            }
            self.quorum_waiters.insert(id);
            return;
        }
        self.quorum_waiters.remove(&id);
        let ok = ok && !self.needs_quorum(r);
        self.actions.push_back(Action::Complete {
            id,
            result: if ok {
                Ok(())
            } else if r.local == Leg::Done || r.peer == Leg::Done {
                Err(IoFailure::NoQuorum)
            } else {
                Err(IoFailure::NoCopy)
            },
        });
        self.finish(id);
    }

    // ---- quorum (rules 2 and 3) ----

    /// Whether request `r`, complete on the local disk only, must wait for
    /// the witness to outdate the peer before it may complete.
    fn needs_quorum(&self, r: &Request) -> bool {
        self.cfg.quorum.is_some()
            && !r.from_peer
            && !matches!(r.op, Op::Read | Op::ResyncChunk | Op::VerifyChunk)
            && r.peer != Leg::Done
            && (self.record.epoch == 0 || self.record.peer_up_to_date)
    }

    /// The peer is back and mirrors writes again: send it the writes that
    /// waited for quorum; each completes once the peer has it.
    fn resend_quorum_waiters(&mut self) {
        for id in self.quorum_waiters.clone() {
            if self
                .table
                .requests
                .get(&id)
                .is_some_and(|r| r.peer != Leg::Pending && r.op != Op::Read)
            {
                self.resend_to_peer(id);
            }
        }
    }

    /// Issues request `id`'s peer leg (again).
    fn resend_to_peer(&mut self, id: RequestId) {
        let Some(r) = self.table.requests.get_mut(&id) else {
            return;
        };
        r.peer = Leg::Pending;
        let (op, range) = (r.op, r.range);
        self.send_to_peer(id, op, range, false);
    }

    /// Asks the witness for what the state needs, one change at a time.
    fn want_witness(&mut self) {
        if self.cfg.quorum.is_none() || self.witness_pending || self.witness_backoff {
            return;
        }
        let rec = self.record;
        // Only a copy that is up to date on disk (not just in memory, as
        // right after a resync into a primary), with the generation it
        // writes under on disk too, may have the witness drop its peer:
        // after a crash it must still be the newer copy.
        let durable = self.durable.0 == DiskState::UpToDate && self.durable.1 == self.gens;
        let outdate = durable
            && (!self.quorum_waiters.is_empty()
                || (self.role == Role::Primary
                    && self.disk == DiskState::UpToDate
                    && !self.replicating()
                    && rec.epoch > 0
                    && rec.peer_up_to_date));
        let restore = rec.epoch > 0
            && rec.me_up_to_date
            && !rec.peer_up_to_date
            && self.disk == DiskState::UpToDate
            && matches!(self.peer, Some((v, Relation::InSync)) if v.disk == DiskState::UpToDate);
        let op = if outdate {
            WitnessOp::Outdate
        } else if restore {
            WitnessOp::Restore
        } else {
            return;
        };
        self.witness_pending = true;
        self.actions.push_back(Action::WitnessChange {
            op,
            expected_epoch: rec.epoch,
        });
    }

    /// The witness answered a change: `Some(record)` when it was done or the
    /// epoch had moved on (decide again), `None` when it failed or was refused.
    pub fn witness_change_done(&mut self, outcome: Option<RecordView>) {
        self.witness_pending = false;
        match outcome {
            Some(view) => {
                if self.quorum_lost {
                    self.quorum_lost = false;
                    self.actions
                        .push_back(Action::Notify(Notice::QuorumRegained));
                }
                self.witness_record(view);
            }
            None => {
                self.witness_backoff = true;
                if !self.quorum_waiters.is_empty() && !self.quorum_lost {
                    self.quorum_lost = true;
                    self.actions.push_back(Action::Notify(Notice::QuorumLost));
                }
                if self.cfg.quorum == Some(NoQuorumPolicy::IoError) {
                    self.fail_quorum_waiters();
                }
                self.after_event();
            }
        }
    }

    /// Periodic: retry a failed witness change.
    pub fn tick(&mut self) {
        self.witness_backoff = false;
        // Finished writes do not wait for a flush for longer than about
        // two ticks (the shell ticks every 50 ms).
        if self.unflushed.has_open() {
            self.unflushed_ticks = self.unflushed_ticks.saturating_add(1);
        } else {
            self.unflushed_ticks = 0;
        }
        self.flush_if_needed();
        self.want_witness();
        self.check_invariants();
    }

    /// The witness record (from a heartbeat, a change, or the peer's newer
    /// view).
    pub fn witness_record(&mut self, view: RecordView) {
        if self.cfg.quorum.is_none() || view.epoch < self.record.epoch {
            return;
        }
        if view != self.record {
            self.record = view;
            let token = self.persist();
            // Writes released by this record complete only once it is on
            // disk: after a crash this node still knows the peer missed them.
            for id in &self.quorum_waiters {
                if let Some(r) = self.table.requests.get_mut(id) {
                    r.meta_token = r.meta_token.max(token);
                }
            }
            // The peer adopts a newer record from our view: both then claim
            // the same record (a re-initialised witness needs that).
            self.actions.push_back(Action::AnnounceState);
        }
        // The witness made the peer primary, or outdated this node (it may
        // have missed the records in between): it is no primary any more.
        if self.role == Role::Primary
            && view.epoch > 0
            && (view.primary == Holder::Peer || !view.me_up_to_date)
        {
            self.fence();
        }
        let in_sync = matches!(self.peer, Some((_, Relation::InSync)));
        if view.epoch > 0
            && !view.me_up_to_date
            && self.disk == DiskState::UpToDate
            && self.role == Role::Secondary
            && !in_sync
        {
            self.disk = DiskState::Outdated;
            self.persist();
            self.actions.push_back(Action::AnnounceState);
            self.actions.push_back(Action::Notify(Notice::Outdated));
            self.renegotiate();
        }
        if self.quorum_lost && !view.peer_up_to_date {
            self.quorum_lost = false;
            self.actions
                .push_back(Action::Notify(Notice::QuorumRegained));
        }
        for id in self.quorum_waiters.clone() {
            self.try_complete(id);
        }
        self.after_event();
    }

    /// Fails every write waiting for quorum with EIO.
    fn fail_quorum_waiters(&mut self) {
        let ids = std::mem::take(&mut self.quorum_waiters);
        self.fail_requests(ids, IoFailure::NoQuorum);
    }

    /// The witness made the peer primary: stop being primary at once.
    fn fence(&mut self) {
        // Whatever may still be lost in a power cut of either copy is
        // marked: the new primary does not know of it.
        let writes = self.unflushed.take_all();
        if self.disk != DiskState::Diskless {
            for w in &writes {
                let pages = self.bitmap.set_range(w.range.offset, w.range.len);
                self.pages_to_persist.extend(pages);
            }
        }
        self.release_pins(writes);
        self.role = Role::Secondary;
        self.export_after = None;
        self.actions.push_back(Action::Export(false));
        self.actions.push_back(Action::Notify(Notice::Fenced));
        self.fail_quorum_waiters();
        let frozen = std::mem::take(&mut self.frozen);
        self.fail_requests(frozen, IoFailure::NoQuorum);
        self.persist();
        self.actions.push_back(Action::AnnounceState);
    }

    /// What this node tells the witness about the volume: the record it last
    /// saw or, never having seen one, what it knows; and whether it is
    /// primary now.
    pub fn claim(&self) -> (RecordView, bool) {
        let view = if self.record.epoch > 0 {
            self.record
        } else {
            RecordView {
                epoch: 0,
                primary: if self.role == Role::Primary {
                    Holder::Me
                } else if self.peer_is_primary() {
                    Holder::Peer
                } else {
                    Holder::Nobody
                },
                me_up_to_date: self.disk == DiskState::UpToDate,
                peer_up_to_date: matches!(
                    self.peer,
                    Some((v, Relation::InSync)) if v.disk == DiskState::UpToDate
                ),
                forced: false,
            }
        };
        (view, self.role == Role::Primary)
    }

    /// The witness record as last seen.
    pub fn record(&self) -> RecordView {
        self.record
    }

    fn finish(&mut self, id: RequestId) {
        if let Some(r) = self.table.requests.get(&id) {
            if r.op == Op::Flush {
                let done = self
                    .unflushed
                    .flushed(id, r.local == Leg::Done, r.peer == Leg::Done);
                self.release_pins(done);
            }
        }
        if let Some(r) = self.table.requests.get(&id)
            && r.al_pinned
        {
            // A finished write keeps its extents in the activity log until
            // it is durable on every copy that has it (rule 6).
            let peer_volatile = self.peer.is_none_or(|(v, _)| v.volatile_cache);
            // A disk that failed since its leg completed holds nothing that
            // matters any more (the copy needs a full resync).
            let local_volatile = self.cfg.volatile_cache && self.disk != DiskState::Diskless;
            let w = UnflushedWrite {
                range: r.range,
                local: r.local == Leg::Done && r.op.volatile_write() && local_volatile,
                peer: r.peer == Leg::Done
                    && r.op.volatile_write()
                    && !r.forwarded
                    && !r.peer_marked
                    && peer_volatile,
            };
            if w.durable() {
                self.al.end(w.range.offset, w.range.len);
            } else {
                self.unflushed.add(w);
            }
        }
        for next in self.table.remove(id) {
            self.start(next);
        }
        for waiting in std::mem::take(&mut self.al_waiting) {
            if self.table.requests.contains_key(&waiting) {
                self.start(waiting);
            }
        }
        if id < INTERNAL_ID_BASE
            && matches!(self.peer, Some((_, Relation::SyncTarget)))
            && !self.forwarding()
            && !self.has_client_requests()
        {
            // Now ready to receive the resync (see `view`).
            self.actions.push_back(Action::AnnounceState);
        }
    }

    fn has_client_requests(&self) -> bool {
        self.table
            .requests
            .keys()
            .next()
            .is_some_and(|id| *id < INTERNAL_ID_BASE)
    }

    /// Whether a client write may still land on the local disk. A primary
    /// forwarding to its sync source writes nothing locally; a secondary
    /// (a fenced primary) counts every client request it still holds.
    fn has_local_client_writes(&self) -> bool {
        // A forwarding primary writes a block locally only after the sync
        // source has applied it, and the source serialises its writes with
        // the resync chunks it reads: resync data and such a local write of
        // the same bytes always agree, so it need not wait for them.
        !self.forwarding() && self.has_client_requests()
    }

    /// The local leg of `id` finished.
    pub fn local_done(&mut self, id: RequestId, ok: bool) {
        if let Some((flush, source)) = self.target.done_flush
            && flush == id
        {
            self.target.done_flush = None;
            return self.sync_done_flushed(source, ok);
        }
        if let Some(r) = self.table.requests.get_mut(&id) {
            r.local = if ok { Leg::Done } else { Leg::Failed };
        }
        if !ok {
            self.local_disk_failed();
        }
        self.try_complete(id);
        self.after_event();
    }

    /// The peer leg of `id` finished (`ok` false: the peer reported an error
    /// or the link dropped).
    pub fn peer_done(&mut self, id: RequestId, ok: bool) {
        if self.source.flush.as_ref().is_some_and(|(f, _)| *f == id) {
            self.resync_flushed(ok);
            self.after_event();
            return;
        }
        let Some(r) = self.table.requests.get_mut(&id) else {
            return;
        };
        if r.peer != Leg::Pending {
            return;
        }
        if r.op == Op::ResyncChunk {
            self.resync_chunk_finished(id, ok);
            self.after_event();
            return;
        }
        if ok {
            r.peer = Leg::Done;
            if r.forwarded
                && matches!(r.op, Op::Write { .. } | Op::Zeroes { .. })
                && self.disk != DiskState::Diskless
            {
                // The sync source has it: now this copy (see
                // `has_local_client_writes` for why the order is safe).
                r.local = Leg::Pending;
                let (op, range) = (r.op, r.range);
                self.actions.push_back(Action::LocalIo { id, op, range });
            }
        } else {
            self.peer_leg_lost(id);
        }
        self.try_complete(id);
        self.after_event();
    }

    /// The peer will not have request `id`: cover its range in the bitmap.
    /// A forwarded request (the peer, its sync source, refused it or the
    /// link dropped) is held back instead: this copy cannot serve it.
    fn peer_leg_lost(&mut self, id: RequestId) {
        let Some(r) = self.table.requests.get_mut(&id) else {
            return;
        };
        r.peer = Leg::Unused;
        if r.forwarded {
            r.forwarded = false;
            self.frozen.insert(id);
            // The sync source may have applied it (only its answer was
            // lost): the copies may differ there whatever becomes of the
            // request, so the next resync copies the range (the source
            // adds this node's dirty runs to its own).
            let range = r.range;
            if matches!(r.op, Op::Write { .. } | Op::Zeroes { .. }) {
                let pages = self.bitmap.set_range(range.offset, range.len);
                if !pages.is_empty() {
                    self.pages_to_persist.extend(pages);
                    self.persist();
                }
            }
            return;
        }
        // Sent, so the peer may have applied it.
        r.needs_local_flush = true;
        let (op, range) = (r.op, r.range);
        if matches!(op, Op::Write { .. } | Op::Zeroes { .. }) {
            // The generation change must be recorded before any write
            // completes without the peer.
            if self.replicating && self.role == Role::Primary && self.disk == DiskState::UpToDate {
                let id = self.fresh_id();
                self.start_tracking(id);
                self.replicating = false;
                self.actions.push_back(Action::Notify(Notice::PeerOutdated));
            }
            let pages = self.bitmap.set_range(range.offset, range.len);
            self.pages_to_persist.extend(pages);
            let token = self.persist();
            if let Some(r) = self.table.requests.get_mut(&id) {
                r.meta_token = token;
            }
        }
    }

    /// Metadata up to `token` is durable.
    pub fn meta_persisted(&mut self, token: u64) {
        self.meta_persisted = self.meta_persisted.max(token);
        let before = self.durable;
        while let Some(&(t, disk, gens)) = self.pending_durable.front()
            && t <= self.meta_persisted
        {
            self.durable = (disk, gens);
            self.pending_durable.pop_front();
        }
        if self.durable != before {
            self.actions.push_back(Action::AnnounceState);
        }
        let ready: Vec<RequestId> = self
            .table
            .requests
            .iter()
            .filter(|(_, r)| r.meta_token != 0 && r.meta_token <= self.meta_persisted)
            .map(|(id, _)| *id)
            .collect();
        let has_disk = self.disk != DiskState::Diskless;
        let al_ready: Vec<RequestId> = self
            .table
            .requests
            .iter()
            .filter(|(_, r)| r.start_after != 0 && r.start_after <= self.meta_persisted)
            .map(|(id, _)| *id)
            .collect();
        for id in al_ready {
            if let Some(r) = self.table.requests.get_mut(&id) {
                r.start_after = 0;
            }
            let replicating = self.replicating();
            self.start_legs(id, replicating, has_disk);
        }
        for id in ready {
            if let Some(r) = self.table.requests.get_mut(&id) {
                r.meta_token = 0;
                if r.local_deferred {
                    r.local_deferred = false;
                    if has_disk {
                        r.local = Leg::Pending;
                        self.actions.push_back(Action::LocalIo {
                            id,
                            op: r.op,
                            range: r.range,
                        });
                    }
                }
            }
            self.try_complete(id);
        }
        self.release_export();
        if self.source.full_sync_announce && self.source.full_sync_token <= self.meta_persisted {
            // Tell the target the base it may adopt (see `full_sync_base`).
            self.source.full_sync_announce = false;
            if before == self.durable {
                self.actions.push_back(Action::AnnounceState);
            }
        }
        if self
            .announce_after
            .is_some_and(|t| t <= self.meta_persisted)
        {
            self.announce_after = None;
            self.actions.push_back(Action::AnnounceState);
        }
        if let Some(t) = self.source.sync_done_after
            && t <= self.meta_persisted
        {
            self.source.sync_done_after = None;
            self.source.sync_done_current = self.gens.current;
            self.actions.push_back(Action::SendSyncDone {
                generations: self.gens,
            });
            self.actions.push_back(Action::Notify(Notice::ResyncDone));
        }
        self.after_event();
    }

    /// Persisting metadata failed: the local disk is unusable.
    pub fn meta_failed(&mut self) {
        self.local_disk_failed();
        self.release_export();
        // Requests that waited for the metadata can only finish through the peer.
        let waiting: Vec<RequestId> = self
            .table
            .requests
            .iter()
            .filter(|(_, r)| r.meta_token != 0)
            .map(|(id, _)| *id)
            .collect();
        for id in waiting {
            if let Some(r) = self.table.requests.get_mut(&id) {
                r.meta_token = 0;
                r.local_deferred = false;
                if r.local == Leg::Unused {
                    r.local = Leg::Failed;
                }
            }
            self.try_complete(id);
        }
        self.after_event();
    }

    /// The local disk failed outside a tracked request (e.g. a resync read).
    pub fn disk_failed(&mut self) {
        self.local_disk_failed();
        self.after_event();
    }

    fn local_disk_failed(&mut self) {
        if self.disk == DiskState::Diskless {
            return;
        }
        self.disk = DiskState::Diskless;
        let done = self.unflushed.local_lost();
        self.release_pins(done);
        self.meta_persisted = self.meta_issued; // nothing more can be persisted
        self.pending_durable.clear();
        self.durable = (DiskState::Diskless, self.gens);
        self.actions
            .push_back(Action::Notify(Notice::LocalDiskFailed));
        self.actions.push_back(Action::AnnounceState);
        self.renegotiate();
    }

    // ---- roles ----

    /// Split-brain resolution on the victim: forget this node's data history
    /// (its copy becomes Inconsistent) so that the peer overwrites it with a
    /// full resync. Refused while primary.
    pub fn discard_local(&mut self) -> Result<u64, MaintenanceError> {
        if self.role == Role::Primary {
            return Err(MaintenanceError::IsPrimary);
        }
        self.disk = DiskState::Inconsistent;
        self.gens = Generations::default();
        let pages = self.bitmap.clear_all();
        self.pages_to_persist.extend(pages);
        let token = self.persist();
        if let Some((v, _)) = self.peer {
            self.peer = Some((v, Relation::Refused("resolving")));
            self.renegotiate();
        }
        self.actions.push_back(Action::AnnounceState);
        self.check_invariants();
        Ok(token)
    }

    /// Whether this node could become primary now (no side effects).
    pub fn promote_check(&self, force: bool) -> Result<(), PromoteError> {
        if self.role == Role::Primary || self.promotes_by_forwarding() {
            // A sync target whose up-to-date source is connected serves
            // through the source until its own copy is complete.
            return Ok(());
        }
        if let Some((p, rel)) = &self.peer {
            if p.role == Role::Primary {
                return Err(PromoteError::PeerPrimary);
            }
            if *rel == Relation::SyncTarget && !force {
                return Err(PromoteError::SyncTarget);
            }
        }
        if self.cache_lost && !force {
            return Err(PromoteError::CacheLost);
        }
        match self.disk {
            DiskState::Diskless if !matches!(self.peer, Some((_, Relation::DisklessClient))) => {
                Err(PromoteError::Diskless)
            }
            DiskState::Outdated | DiskState::Inconsistent if !force => {
                Err(PromoteError::NotUpToDate {
                    disk: self.disk,
                    missing_bytes: self.target.interrupted_missing_bytes,
                })
            }
            _ => Ok(()),
        }
    }

    /// Whether a promotion now starts a forced history (it needs `force`):
    /// this copy is not known to be complete (Outdated or Inconsistent; a
    /// copy the witness outdated is Outdated on disk by then, as the record
    /// that outdated it marked it so) and does not promote by forwarding
    /// through its sync source.
    pub fn promotion_is_forced(&self) -> bool {
        self.role != Role::Primary
            && !self.promotes_by_forwarding()
            && (matches!(self.disk, DiskState::Outdated | DiskState::Inconsistent)
                || self.cache_lost)
    }

    /// Makes this node primary. Returns the metadata token to wait for.
    pub fn promote(&mut self, force: bool) -> Result<u64, PromoteError> {
        if self.role == Role::Primary {
            return Ok(self.meta_issued);
        }
        self.promote_check(force)?;
        if self.promotion_is_forced() {
            // Forced: this copy starts a new data history, marked forced so
            // that it never passes for one holding every acknowledged write.
            assert!(force, "only a forced promotion starts a new history");
            let id = self.fresh_id();
            self.gens.start_new_history(id);
            self.meta_flush_data = true;
            self.disk = DiskState::UpToDate;
            self.cache_lost = false;
        }
        self.role = Role::Primary;
        if self.peer.is_some() {
            self.renegotiate();
        }
        if !self.replicating() && self.disk == DiskState::UpToDate {
            // Writing without the peer from the start: track changes for it
            // under a generation of this node's own. Even when a bitmap
            // base is set already: the current generation may be the one
            // the peer took at the end of a resync from this node (the
            // confirmation that would have moved it to the bitmap base was
            // lost with this node's restart), and writes completed under a
            // generation the peer holds too would pass for ones it has.
            // (The base stays: a peer at the base still gets a bitmap
            // resync.)
            let id = self.fresh_id();
            self.start_tracking(id);
        }
        self.replicating = self.replicating();
        let token = self.persist();
        self.actions.push_back(Action::AnnounceState);
        // Applications see the volume only once this node's primary state
        // (up to date, new generation) is on disk: a crash before that must
        // not leave acknowledged writes on a copy whose metadata says
        // otherwise.
        if self.meta_durable(token) {
            self.actions.push_back(Action::Export(true));
        } else {
            self.export_after = Some(token);
        }
        self.check_invariants();
        Ok(token)
    }

    fn release_export(&mut self) {
        if let Some(t) = self.export_after
            && t <= self.meta_persisted
        {
            self.export_after = None;
            if self.role == Role::Primary {
                self.actions.push_back(Action::Export(true));
            }
        }
    }

    /// Whether applications may use the volume on this node now (primary
    /// and its primary state is durable).
    pub fn exported(&self) -> bool {
        self.role == Role::Primary && self.export_after.is_none()
    }

    /// Makes this node secondary.
    pub fn demote(&mut self) -> Result<u64, DemoteError> {
        if self.role == Role::Secondary {
            return Ok(self.meta_issued);
        }
        // Requests frozen while the sync source is away were never
        // acknowledged: they fail, so that the node can step down.
        let busy = self.status().inflight_requests - self.frozen.len();
        if busy > 0 {
            return Err(DemoteError::Busy(busy));
        }
        if !self.unflushed.is_empty() {
            // The new primary will not know what this copy may still lose
            // in a power cut: make it durable here and there first.
            self.flush_wanted = true;
            self.flush_if_needed();
            return Err(DemoteError::Flushing(self.unflushed.len()));
        }
        let frozen = std::mem::take(&mut self.frozen);
        self.fail_requests(frozen, IoFailure::NoCopy);
        self.role = Role::Secondary;
        self.export_after = None;
        self.actions.push_back(Action::Export(false));
        let token = self.persist();
        self.actions.push_back(Action::AnnounceState);
        self.after_event();
        Ok(token)
    }

    // ---- peer ----

    /// The peer's state arrived (first time after connecting, or changed).
    pub fn peer_state(&mut self, view: NodeView) {
        if self.cfg.quorum.is_some() && view.record.epoch > self.record.epoch {
            // The peer saw a newer witness record: the same record for both.
            self.witness_record(view.record.swapped());
        }
        let first = self.peer.is_none();
        if first {
            self.target.interrupted_missing_bytes = None;
        }
        let old = self.peer;
        let rel = old
            .map(|(_, r)| r)
            .unwrap_or(Relation::Refused("negotiating"));
        self.peer = Some((view, rel));
        let renegotiate = first
            || matches!(
                rel,
                Relation::NoData | Relation::Refused(_) | Relation::Diverged
            )
            || old.is_some_and(|(v, _)| {
                v.disk != view.disk || v.role != view.role || v.generations != view.generations
            })
            // The peer marked chunks out of sync (verify) and asks to resync.
            || (rel == Relation::InSync
                && view.dirty_chunks > 0
                && old.is_some_and(|(v, _)| v.dirty_chunks == 0));
        if rel == Relation::InSync
            && self.gens.bitmap != 0
            && self.bitmap.set_count() == 0
            && view.disk == DiskState::UpToDate
            && view.generations.current == self.gens.current
        {
            // The target confirmed the finished resync.
            self.gens.sync_source_done();
            self.source.sync_done_current = 0;
            self.persist();
        }
        if first
            && self.source.sync_done_current != 0
            && view.generations.current == self.source.sync_done_current
            && self.gens.rebase(self.source.sync_done_current)
        {
            // The link dropped after the target took our generation at the
            // end of a resync but before it could confirm: our bitmap holds
            // every change since (it was empty then), so resync just that.
            self.source.sync_done_current = 0;
            self.persist();
        }
        if renegotiate {
            self.renegotiate();
        } else if let Relation::SyncSource {
            target_ready: false,
            full,
        } = rel
            && view.sync_target
        {
            self.target_ready(view, full);
        } else if matches!(
            rel,
            Relation::SyncSource {
                target_ready: true,
                ..
            }
        ) && view.sync_target
            && old.is_some_and(|(v, _)| !v.sync_target)
        {
            // The target was briefly not ready (it refused what was in
            // flight; those chunks stay marked) and is again: go on. A
            // refused chunk does not pump by itself, so without this the
            // pass would wait for the next window change.
            self.pump_resync();
        }
        self.adopt_full_sync_base();
        self.resume_frozen(true);
        self.after_event();
    }

    fn renegotiate(&mut self) {
        let Some((view, old)) = self.peer else { return };
        self.trust_the_witness_over_a_stalled_sync(&view);
        let mut new = negotiate(
            &self.view(),
            &view,
            self.cfg.tie_winner,
            self.peer_dirty.is_some(),
        );
        if let Some(forced) = self.witness_direction(&view, new) {
            new = forced;
        }
        let same = std::mem::discriminant(&new) == std::mem::discriminant(&old);
        if new == old || (same && !matches!(new, Relation::Refused(_))) {
            if let Relation::SyncSource {
                target_ready: false,
                full,
            } = old
            {
                if view.sync_target {
                    self.target_ready(view, full);
                } else {
                    // The peer changed but is not our target yet: it may
                    // have decided on an older view of ours (one that
                    // announced no dirty chunks); tell it where we stand.
                    self.actions.push_back(Action::AnnounceState);
                }
            }
            return;
        }
        self.peer = Some((view, new));
        if !matches!(new, Relation::SyncSource { .. }) {
            // No longer the source: the pass is over (its chunks in flight
            // finish on their own; what they did not copy stays marked).
            self.source.pass = None;
        }
        match new {
            Relation::SyncSource { full, .. } => {
                // The peer's own marks join this bitmap only once it is our
                // target (`target_ready`): until then they stay in its
                // bitmap, and the dirty count this node announces stays its
                // own, which is what the peer's negotiation reads as "marks
                // of its own" (a copy that kept power against one that lost
                // it: see `negotiate`).
                if full {
                    // Track the copy under a bitmap base the target can
                    // adopt (see `adopt_full_sync_base`).
                    if self.gens.bitmap == 0 {
                        let id = self.fresh_id();
                        self.start_tracking(id);
                    }
                    let pages = self.bitmap.set_all();
                    self.pages_to_persist.extend(pages);
                    self.source.full_sync_token = self.persist();
                    self.source.full_sync_announce = true;
                }
                self.source.pass = Some(ResyncProgress {
                    total_chunks: self.bitmap.set_count(),
                    ..Default::default()
                });
                self.actions
                    .push_back(Action::Notify(Notice::ResyncStarted));
                if view.sync_target {
                    self.target_ready(view, full);
                }
            }
            Relation::SyncTarget => {
                self.disk = DiskState::Inconsistent;
                let token = self.persist();
                self.announce_after = Some(token);
            }
            Relation::ServingDiskless => {
                // The peer's old disk will need everything once it returns.
                if self.gens.bitmap == 0 {
                    let id = self.fresh_id();
                    self.start_tracking(id);
                }
                let pages = self.bitmap.set_all();
                self.pages_to_persist.extend(pages);
                self.persist();
            }
            Relation::InSync => {
                if self.disk == DiskState::Outdated {
                    self.disk = DiskState::UpToDate;
                    self.persist();
                }
            }
            Relation::Diverged => self.actions.push_back(Action::Notify(Notice::SplitBrain)),
            Relation::Refused(why) => self
                .actions
                .push_back(Action::Notify(Notice::PeerRefused(why))),
            Relation::DisklessClient | Relation::NoData => {}
        }
        self.actions.push_back(Action::AnnounceState);
    }

    /// Both copies Inconsistent, each waiting for the other: this node
    /// became a sync target of the peer (on a witness record that was stale
    /// then) and the peer later became one of this node. The witness lists
    /// this copy as up to date and not the peer, and the peer's generations
    /// descend from this copy's (its bitmap base is our current): the peer's
    /// newer writes were never acknowledged (rule 2: acknowledging them
    /// needed the witness to outdate this copy), and whatever of them the
    /// resync brought here are such writes too. So this copy holds every
    /// acknowledged write: it is up to date again and the peer is resynced
    /// from it. Without this neither copy ever becomes consistent.
    fn trust_the_witness_over_a_stalled_sync(&mut self, view: &NodeView) {
        if self.disk != DiskState::Inconsistent
            || view.disk != DiskState::Inconsistent
            || self.role != Role::Secondary
            || self.cfg.quorum.is_none()
            || self.record.epoch == 0
            || !self.record.me_up_to_date
            || self.record.peer_up_to_date
            || self.record.forced
            || self.gens.current == 0
            || view.generations.bitmap != self.gens.current
            || self.gens.forced_apart(&view.generations)
        {
            return;
        }
        self.disk = DiskState::UpToDate;
        self.persist();
    }

    /// The connection to the peer is gone.
    pub fn peer_disconnected(&mut self) {
        if self.peer.is_none() {
            return;
        }
        let pending: Vec<RequestId> = self
            .table
            .requests
            .iter()
            .filter(|(_, r)| r.peer == Leg::Pending)
            .map(|(id, _)| *id)
            .collect();
        self.source.on_disconnect();
        if let Some(mut v) = self.verify.take() {
            v.aborted = true;
            v.inflight = 0;
            self.last_verify = Some(v);
        }
        let resync_ids: Vec<RequestId> = self
            .table
            .requests
            .iter()
            .filter(|(_, r)| matches!(r.op, Op::ResyncChunk | Op::VerifyChunk))
            .map(|(id, _)| *id)
            .collect();
        for id in resync_ids {
            // Started or queued, these chunks stay dirty for the next resync.
            self.finish(id);
        }
        for id in pending {
            if self
                .table
                .requests
                .get(&id)
                .is_some_and(|r| r.op != Op::ResyncChunk)
            {
                self.peer_leg_lost(id);
                self.try_complete(id);
            }
        }
        if let Some((view, Relation::SyncTarget)) = self.peer {
            self.target
                .on_disconnect(&view, self.cfg.chunk_bytes, self.cfg.data_bytes);
        }
        self.target.done_flush = None;
        self.peer = None;
        self.peer_dirty = None;
        self.announce_after = None;
        // Writes it acknowledged but never flushed (issue 13, hole 1).
        self.peer_acks_lost();
        self.after_event();
    }

    /// Tracks an engine-internal request for one whole chunk (resync or
    /// verify); returns its id and whether it may start now.
    fn insert_chunk_request(&mut self, op: Op, chunk: u64, count: u64) -> (RequestId, bool) {
        let offset = chunk * self.cfg.chunk_bytes;
        let len = (count * self.cfg.chunk_bytes).min(self.cfg.data_bytes - offset);
        let id = self.internal_id();
        (
            id,
            self.table
                .insert(id, Request::new(op, Range::new(offset, len))),
        )
    }

    // ---- online verify and on-demand resync ----

    /// Starts comparing every chunk's digest with the peer's. Mismatching
    /// chunks are marked out of sync (fix them with `request_resync`).
    pub fn start_verify(&mut self) -> Result<(), MaintenanceError> {
        let Some((view, rel)) = self.peer else {
            return Err(MaintenanceError::NotInSync("disconnected"));
        };
        if rel != Relation::InSync || self.disk != DiskState::UpToDate {
            return Err(MaintenanceError::NotInSync(rel.name()));
        }
        if view.role == Role::Primary {
            return Err(MaintenanceError::PeerPrimary);
        }
        if self.verify.is_some() {
            return Err(MaintenanceError::Busy);
        }
        self.verify = Some(VerifyProgress {
            total_chunks: self.bitmap.chunks(),
            ..Default::default()
        });
        self.pump_verify();
        self.check_invariants();
        Ok(())
    }

    fn pump_verify(&mut self) {
        let Some(mut prog) = self.verify.take() else {
            return;
        };
        let mut started = Vec::new();
        while prog.inflight < RESYNC_WINDOW && prog.cursor < prog.total_chunks {
            let chunk = prog.cursor;
            prog.cursor += 1;
            prog.inflight += 1;
            let (id, may_start) = self.insert_chunk_request(Op::VerifyChunk, chunk, 1);
            if may_start {
                started.push(id);
            }
        }
        if prog.inflight == 0 && prog.cursor >= prog.total_chunks {
            self.last_verify = Some(prog);
            self.persist();
            self.actions.push_back(Action::Notify(Notice::VerifyDone));
            return;
        }
        self.verify = Some(prog);
        for id in started {
            self.start(id);
        }
    }

    /// A verify chunk finished: `equal` says whether both digests matched
    /// (None: it could not be compared).
    pub fn verify_done(&mut self, id: RequestId, equal: Option<bool>) {
        let Some(r) = self.table.requests.get(&id) else {
            return;
        };
        if r.op != Op::VerifyChunk {
            return;
        }
        let chunk = r.range.offset / self.cfg.chunk_bytes;
        let range = r.range;
        if let Some(p) = self.verify.as_mut() {
            p.inflight = p.inflight.saturating_sub(1);
            if equal.is_some() {
                p.checked_chunks += 1;
            }
            if equal == Some(false) {
                p.mismatched_chunks += 1;
                let extends = matches!(p.mismatches.last(), Some((f, c)) if f + c == chunk);
                if extends {
                    if let Some((_, c)) = p.mismatches.last_mut() {
                        *c += 1;
                    }
                } else if p.mismatches.len() < VERIFY_REPORT_RUNS_MAX {
                    p.mismatches.push((chunk, 1));
                }
            }
        }
        if equal == Some(false) {
            let pages = self.bitmap.set_range(range.offset, range.len);
            self.pages_to_persist.extend(pages);
        }
        self.finish(id);
        self.pump_verify();
        self.after_event();
    }

    /// Resyncs the chunks this node has marked out of sync (after a verify).
    pub fn request_resync(&mut self) -> Result<bool, MaintenanceError> {
        let Some((view, rel)) = self.peer else {
            return Err(MaintenanceError::NotInSync("disconnected"));
        };
        if self.bitmap.set_count() == 0 {
            return Ok(false);
        }
        if view.role == Role::Primary {
            return Err(MaintenanceError::PeerPrimary);
        }
        if rel != Relation::InSync {
            return Err(MaintenanceError::NotInSync(rel.name()));
        }
        // The peer renegotiates when it sees our dirty bits and becomes the
        // target; this node becomes the source.
        self.renegotiate();
        self.after_event();
        Ok(true)
    }
}

#[cfg(test)]
mod tests;
