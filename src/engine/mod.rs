//! The replication engine of one volume: a deterministic state machine with
//! no I/O of its own. The shell (`crate::volume`) feeds it events (requests,
//! I/O completions, peer state) and carries out the actions it emits (issue a
//! local or peer I/O, persist metadata, complete a request, announce state).
//! Same inputs, same outputs: the simulator in `sim/` drives it with seeded
//! faults.
//!
//! Where each event is handled (every file is an `impl Engine` of one
//! concern; the fields it owns are named in its module doc):
//!
//! | event | entry point | code |
//! |---|---|---|
//! | client request | `submit` | `write` (the write path: table entry, legs, completion), `request` (table, overlaps) |
//! | write forwarded by the peer | `submit_forwarded` | `forward` (forwarding through a sync source, both sides) |
//! | local or peer I/O done | `local_done`, `peer_done` | `write`; resync chunks and flushes: `sync_source`; the "sync done" flush: `sync_target`; verify digests: `verify` |
//! | metadata durable | `meta_persisted`, `meta_failed` | `metadata` (sequencing, tokens); unflushed writes: `durability` |
//! | peer state | `peer_state` → `renegotiate` | `relation`, over the pure decisions of `negotiate` (`negotiate`: generations; `witness_direction`: the record) |
//! | link lost | `peer_disconnected` | `relation`, `SyncSource::on_disconnect`, `SyncTarget::on_disconnect` |
//! | request from the peer | `accepts_peer_request` | `replica` (writes, flushes, digests, reads it applies) |
//! | resync finished | `peer_sync_done` | `sync_target` |
//! | witness | `witness_record`, `witness_change_done` | `quorum` (rules 2 and 3) |
//! | local disk failed | `disk_failed` | `write` |
//! | timer | `tick` | this file, `durability` (the engine's own flushes) |
//! | operator | `promote`, `demote`, `discard_local` | `roles` |
//! | operator | `start_verify`, `request_resync` | `verify` |
//!
//! What the shell sees (actions, notices, config, status, errors) is `api`.
//!
//! Three questions, three files:
//! - Where are resync decisions made? `negotiate` decides (which way, bitmap
//!   or full, from both views and the witness record); `relation` applies
//!   the decision, and `sync_source` / `sync_target` carry the resync out.
//! - Where are a write's legs tracked? `write` (legs, completion, what a
//!   finished write leaves behind), over the table in `request`.
//! - Where is generation negotiation? `negotiate`, over the comparison of
//!   `crate::meta::generation`.
//!
//! `check_invariants` (`invariants`) runs at the end of every mutator in
//! debug builds.

mod api;
pub mod durability;
mod forward;
mod invariants;
mod metadata;
pub mod negotiate;
pub mod peer;
mod quorum;
mod relation;
mod replica;
pub mod request;
mod roles;
mod sync_source;
mod sync_target;
mod verify;
mod write;

use std::collections::{BTreeSet, VecDeque};

pub use api::*;
pub use negotiate::{negotiate, witness_direction};
pub use peer::{NodeView, Relation, Role};
pub use replica::PeerRequest;
pub use request::{INTERNAL_ID_BASE, Leg, Op, Range, Request, RequestId, RequestTable};

use crate::meta::activity_log::{ActivityLog, AlSnapshot};
use crate::meta::{Bitmap, DiskState, Generations};
use crate::quorum::{Holder, NoQuorumPolicy, RecordView, WitnessOp};
use durability::{Unflushed, UnflushedWrite};
use metadata::{MetaSeq, NextMeta};
use quorum::QuorumState;
use sync_source::SyncSource;
use sync_target::SyncTarget;

/// The engine.
pub struct Engine {
    cfg: EngineConfig,
    role: Role,
    /// This copy's disk state, in memory (what is durable: `durable`).
    disk: DiskState,
    /// This copy's generations, in memory (what is durable: `durable`).
    gens: Generations,
    /// Chunks that may differ from the peer's copy (persisted in pages).
    bitmap: Bitmap,
    /// The peer's last announced view and the relation to it; None while
    /// not connected (or the peer detached the volume).
    peer: Option<(NodeView, Relation)>,
    /// This node as the sync source of its peer (see `sync_source`).
    source: SyncSource,
    /// Every request in flight (client, forwarded, the engine's own).
    table: RequestTable,
    /// Actions for the shell, in order (`poll_action`).
    actions: VecDeque<Action>,
    /// The metadata sequence (see `metadata`).
    meta: MetaSeq,
    /// What the next metadata write carries besides the state (see
    /// `metadata`).
    next_meta: NextMeta,
    /// Feeds fresh generation identifiers.
    rng: u64,
    /// The next id of a request of the engine's own (resync, verify,
    /// flushes, forwarded writes).
    next_internal: RequestId,
    /// Announce the state once this metadata write is durable (a new sync
    /// target's Inconsistent state).
    announce_after: Option<MetaToken>,
    /// Export the volume once this metadata write is durable (a new
    /// primary's state); meaningful while primary.
    export_after: Option<MetaToken>,
    /// Disk state and generations as last made durable: what the peer is
    /// told (it must never act on a state this node could forget in a crash).
    durable: (DiskState, Generations),
    /// States issued in metadata writes not durable yet, in order.
    pending_durable: VecDeque<(MetaToken, DiskState, Generations)>,
    /// Application writes were mirrored to the peer as of the last event
    /// (`after_event` reacts when that changes).
    replicating: bool,
    /// The activity log: extents with writes in flight or not yet durable.
    al: ActivityLog,
    /// The metadata write of the last activity-log snapshot (None: none).
    al_token: Option<MetaToken>,
    /// Requests waiting for an activity-log extent to free.
    al_waiting: VecDeque<RequestId>,
    /// The peer's dirty runs from its last state (None: it sent none, or
    /// too many); meaningful while connected.
    peer_dirty: Option<Vec<(u64, u64)>>,
    /// The last resync this node was the source of, for status.
    last_resync: Option<ResyncProgress>,
    /// The verify pass running (see `verify`).
    verify: Option<VerifyProgress>,
    /// The last verify pass, for status.
    last_verify: Option<VerifyProgress>,
    /// Rules 2 and 3 as this node applies them (see `quorum`).
    quorum: QuorumState,
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
    /// Requests from the peer the shell is applying (see `replica`).
    replicas_in_flight: usize,
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
            meta: MetaSeq::default(),
            next_meta: NextMeta::default(),
            rng: seed,
            next_internal: INTERNAL_ID_BASE,
            announce_after: None,
            export_after: None,
            durable: (disk, gens),
            pending_durable: VecDeque::new(),
            replicating: false,
            al: ActivityLog::new(cfg_al.0, cfg_al.1),
            al_token: None,
            al_waiting: VecDeque::new(),
            peer_dirty: None,
            last_resync: None,
            verify: None,
            last_verify: None,
            quorum: QuorumState::default(),
            frozen: BTreeSet::new(),
            unflushed: Unflushed::default(),
            engine_flush: None,
            unflushed_ticks: 0,
            flush_wanted: false,
            cache_lost: false,
            replicas_in_flight: 0,
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
        self.quorum.record = record;
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
    pub fn recover_activity_log(
        &mut self,
        extents: &[u32],
        extent_bytes: u64,
        al_seq: u64,
    ) -> MetaToken {
        for e in extents {
            let pages = self
                .bitmap
                .set_range(u64::from(*e) * extent_bytes, extent_bytes);
            self.next_meta.pages.extend(pages);
        }
        self.al.set_seq(al_seq + 1);
        // Persist an empty log too: these extents now live in the bitmap.
        self.next_meta.activity_log = Some(self.al.snapshot());
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
    pub fn mark_all_out_of_sync(&mut self) -> MetaToken {
        let pages = self.bitmap.set_all();
        self.next_meta.pages.extend(pages);
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
            record: self.quorum.record,
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
            record: self.quorum.record,
            quorum_waiting: self.quorum.waiters.len(),
            quorum_lost: self.quorum.lost,
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

    /// Periodic: retry a failed witness change.
    pub fn tick(&mut self) {
        self.quorum.change_backoff = false;
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
}

#[cfg(test)]
mod sim;
