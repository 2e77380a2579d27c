//! The replication engine of one volume: a deterministic state machine with
//! no I/O of its own. The shell (`crate::volume`) feeds it events (requests,
//! I/O completions, peer state) and carries out the actions it emits (issue a
//! local or peer I/O, persist metadata, complete a request, announce state).
//! Same inputs, same outputs: the simulator in `tests/` drives it with seeded
//! faults.
//!
//! Where each event is handled (every file is an `impl Engine` of one
//! concern; the fields it owns are named in its module doc):
//!
//! | event | entry point | code |
//! |---|---|---|
//! | client request | `submit`, `submit_forwarded` | this file (write path, legs, forwarding), `request` (table, overlaps) |
//! | local or peer I/O done | `local_done`, `peer_done` | this file; resync chunks and flushes: `sync_source`; the "sync done" flush: `sync_target`; verify digests: `verify` |
//! | metadata durable | `meta_persisted` | this file; unflushed writes: `durability` |
//! | peer state | `peer_state` → `renegotiate` | `relation`, over `peer::negotiate` (generations) and `quorum::witness_direction` (the record) |
//! | link lost | `peer_disconnected` | `relation`, `SyncSource::on_disconnect`, `SyncTarget::on_disconnect` |
//! | resync finished | `peer_sync_done` | `sync_target` |
//! | witness | `witness_record`, `witness_change_done` | `quorum` (rules 2 and 3) |
//! | timer | `tick` | this file, `durability` |
//! | operator | `promote`, `demote`, `discard_local` | `roles` |
//! | operator | `start_verify`, `request_resync` | `verify` |
//!
//! What the shell sees (actions, notices, config, status, errors) is `api`.
//!
//! `check_invariants` (`invariants`) runs at the end of every mutator in
//! debug builds.

mod api;
pub mod durability;
mod invariants;
pub mod peer;
mod quorum;
mod relation;
pub mod request;
mod roles;
mod sync_source;
mod sync_target;
mod verify;

use std::collections::{BTreeSet, VecDeque};

pub use api::*;
pub use peer::{NodeView, Relation, Role, negotiate};
pub use request::{INTERNAL_ID_BASE, Leg, Op, Range, Request, RequestId, RequestTable};

use crate::meta::activity_log::{ActivityLog, AlSnapshot};
use crate::meta::{Bitmap, DiskState, Generations};
use crate::quorum::{Holder, NoQuorumPolicy, RecordView, WitnessOp};
use durability::{Unflushed, UnflushedWrite};
use sync_source::SyncSource;
use sync_target::SyncTarget;

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

    /// The post-processing of an event, in one place: react to the peer
    /// leaving (or joining) the set of nodes that receive writes, resume
    /// held requests, drop the lost-power mark once in sync, flush when
    /// due, ask the witness when needed, and check the invariants.
    ///
    /// Every public mutator that handles an event ends here, except, on
    /// purpose:
    /// - the attach-time setters (`set_cache_lost`, `power_lost`,
    ///   `set_record`, `recover_activity_log`, `continue_activity_log`,
    ///   `mark_all_out_of_sync`): they run before any event, with nothing
    ///   to react to yet;
    /// - `peer_dirty_runs`: always followed by `peer_state`, which ends here;
    /// - `poll_action`: takes an action off the queue and changes nothing;
    /// - `tick`: only the timed parts (`flush_if_needed`, `want_witness`)
    ///   change with time;
    /// - `promote`: it sets `replicating` itself (a new primary starts to
    ///   replicate or to track, it leaves nothing), and what follows from
    ///   its new state (the witness outdating the peer, rule 2) waits until
    ///   that state is durable: `meta_persisted` ends here;
    /// - `discard_local`, `peer_sync_done`, `start_verify`: they only issue
    ///   metadata writes or I/O, whose completions end here.
    ///
    /// Those that do not end here check the invariants themselves (but for
    /// the single-field setters, `peer_dirty_runs` and `poll_action`: see
    /// `invariants`).
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
}

#[cfg(test)]
mod tests;
