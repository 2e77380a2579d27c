//! This node as the sync source of its peer: the state of a resync pass
//! (what it copies, what the target acknowledged but has not flushed yet),
//! the hand-over at its end ("sync done" and its confirmation), and the
//! engine's handlers for them (`impl Engine` below).
//!
//! Lifecycle: `Engine::renegotiate` picks `Relation::SyncSource` and starts
//! a pass (`pass`); `target_ready` adds the target's own marks to the bitmap
//! once it is our target and the chunks flow (`pump_resync`); copied chunks
//! stay marked until a flush on the target covers them (`unflushed`,
//! `flush`); an empty bitmap ends the pass, and "sync done" goes out once
//! this node's metadata is durable (`sync_done_after`), the target's
//! confirmation then dropping the bitmap base (`sync_done_current`).

use super::{Action, Engine, MetaToken, Op, Range, Relation, RequestId, ResyncProgress};
use super::{NodeView, RESYNC_FLUSH_EVERY_BYTES, RESYNC_RUN_MAX_BYTES, RESYNC_WINDOW};

/// What the sync source keeps; each field says when it is meaningful.
#[derive(Debug)]
pub(super) struct SyncSource {
    /// The running pass: only while the relation is `SyncSource` (checked
    /// in `check_invariants`).
    pub(super) pass: Option<ResyncProgress>,
    /// Resynced chunks (first, count) the target acknowledged, not yet
    /// covered by a flush there: still marked in the bitmap.
    pub(super) unflushed: Vec<(u64, u64)>,
    /// The flush in flight on the target and the chunks it covers.
    pub(super) flush: Option<(RequestId, Vec<(u64, u64)>)>,
    /// Token of the metadata write that marked every chunk for the running
    /// full sync (0: none); the peer is told the base once it is durable.
    pub(super) full_sync_token: Option<MetaToken>,
    /// The peer has not yet been told the durable full-sync base.
    pub(super) full_sync_announce: bool,
    /// The pass ended: "sync done" goes out once this metadata write is
    /// durable.
    pub(super) sync_done_after: Option<MetaToken>,
    /// The generation the target takes when it processes the last "sync
    /// done" sent, until it confirms (0: none). The bitmap has held every
    /// change since then.
    pub(super) sync_done_current: u64,
    /// Resync requests kept in flight (see `Engine::set_resync_window`).
    pub(super) window: usize,
}

impl Default for SyncSource {
    fn default() -> Self {
        Self {
            pass: None,
            unflushed: Vec::new(),
            flush: None,
            full_sync_token: None,
            full_sync_announce: false,
            sync_done_after: None,
            sync_done_current: 0,
            window: RESYNC_WINDOW,
        }
    }
}

impl SyncSource {
    /// The link to the target dropped. The pass ends: what it did not copy,
    /// and what the target acknowledged but never flushed, stays marked in
    /// the bitmap for the next one; "sync done" waits for a new connection
    /// (the target decides again). Survive: `sync_done_current` (the target
    /// may have taken our generation before it could confirm: the next
    /// connection rebases on it), the full-sync marking (its token names a
    /// metadata write, and a pass is needed to use it) and the window (the
    /// shell's setting).
    pub(super) fn on_disconnect(&mut self) {
        self.pass = None;
        self.unflushed.clear();
        self.flush = None;
        self.sync_done_after = None;
    }
}

impl Engine {
    /// The sync target persisted its state and has no writes of its own in
    /// flight: add what it marked meanwhile (a fenced primary's last writes)
    /// to the copy, then start sending.
    pub(super) fn target_ready(&mut self, view: NodeView, full: bool) {
        if !full && view.dirty_chunks > 0 {
            let pages = match self.peer_dirty.take() {
                Some(ranges) => {
                    let mut pages = Vec::new();
                    for (first, count) in ranges {
                        pages.extend(self.bitmap.set_range(
                            first.saturating_mul(self.cfg.chunk_bytes),
                            count.saturating_mul(self.cfg.chunk_bytes),
                        ));
                    }
                    pages
                }
                // Too many runs to name: copy everything.
                None => self.bitmap.set_all(),
            };
            if !pages.is_empty() {
                self.next_meta.pages.extend(pages);
                self.persist();
                if let Some(r) = &mut self.source.pass {
                    r.total_chunks = r.done_chunks + self.bitmap.set_count();
                }
                // The target learns what is left to copy now (an upper
                // bound it reports if the resync is cut short).
                self.actions.push_back(Action::AnnounceState);
            }
        }
        self.peer = Some((
            view,
            Relation::SyncSource {
                target_ready: true,
                full,
            },
        ));
        self.pump_resync();
    }

    pub(super) fn pump_resync(&mut self) {
        let Some(mut prog) = self.source.pass else {
            return;
        };
        if !matches!(
            self.peer,
            Some((
                _,
                Relation::SyncSource {
                    target_ready: true,
                    ..
                }
            ))
        ) {
            return;
        }
        let run_max = if self.source.window >= RESYNC_WINDOW {
            (RESYNC_RUN_MAX_BYTES / self.cfg.chunk_bytes.max(1)).max(1)
        } else {
            1
        };
        let chunks = self.bitmap.chunks();
        while prog.inflight < self.source.window {
            let Some(chunk) = self.bitmap.next_set(prog.cursor) else {
                break;
            };
            let mut count = 1;
            while count < run_max && chunk + count < chunks && self.bitmap.get(chunk + count) {
                count += 1;
            }
            prog.cursor = chunk + count;
            prog.inflight += 1;
            let (id, may_start) = self.insert_chunk_request(Op::ResyncChunk, chunk, count);
            if may_start {
                self.start(id);
            }
        }
        if prog.inflight == 0 && self.bitmap.next_set(prog.cursor).is_none() {
            if self.source.flush.is_some() || !self.source.unflushed.is_empty() {
                // Copied chunks stay marked until the target flushed them.
                self.source.pass = Some(prog);
                self.flush_resynced(true);
                return;
            }
            if self.bitmap.set_count() > 0 {
                // Bits set behind the cursor: another pass.
                prog.cursor = 0;
                self.source.pass = Some(prog);
                return self.pump_resync();
            }
            self.last_resync = Some(prog);
            self.source.pass = None;
            // The bitmap base is dropped only when the target confirms it
            // adopted our generation (see `peer_state`).
            if let Some((v, _)) = self.peer {
                self.peer = Some((v, Relation::InSync));
            }
            self.replicating = self.replicating();
            // What the target now holds (copied from this disk's cache) is
            // durable here before the target counts as up to date: until
            // the witness lists it again, a power cut here must not lose
            // writes only the target would still have.
            self.next_meta.flush_data = true;
            let token = self.persist();
            self.source.sync_done_after = Some(token);
            return;
        }
        self.source.pass = Some(prog);
    }

    pub(super) fn resync_chunk_finished(&mut self, id: RequestId, ok: bool) {
        let Some(r) = self.table.requests.get(&id) else {
            return;
        };
        let first = r.range.offset / self.cfg.chunk_bytes;
        let count = r.range.len.div_ceil(self.cfg.chunk_bytes).max(1);
        if let Some(p) = self.source.pass.as_mut() {
            p.inflight = p.inflight.saturating_sub(1);
            if ok {
                p.done_chunks += count;
            }
        }
        if ok {
            self.source.unflushed.push((first, count));
            self.flush_resynced(false);
        }
        self.finish(id);
        if ok {
            self.pump_resync();
        }
    }

    /// Asks the target to flush the chunks it acknowledged (at the end of a
    /// pass, or once `RESYNC_FLUSH_EVERY_BYTES` have piled up).
    fn flush_resynced(&mut self, end_of_pass: bool) {
        if self.source.flush.is_some() || self.source.unflushed.is_empty() {
            return;
        }
        let chunks: u64 = self.source.unflushed.iter().map(|(_, c)| c).sum();
        if !end_of_pass && chunks.saturating_mul(self.cfg.chunk_bytes) < RESYNC_FLUSH_EVERY_BYTES {
            return;
        }
        let id = self.internal_id();
        self.source.flush = Some((id, std::mem::take(&mut self.source.unflushed)));
        self.send_to_peer(id, Op::Flush, Range::new(0, 0), false);
    }

    /// The target's flush finished: the chunks it covers are copied for
    /// good (`ok`) and no longer tracked, durably. Failed: they stay marked
    /// and are copied again.
    pub(super) fn resync_flushed(&mut self, ok: bool) {
        let Some((_, chunks)) = self.source.flush.take() else {
            return;
        };
        if ok {
            let mut cleared = false;
            for (first, count) in chunks {
                for chunk in first..first + count {
                    if let Some(page) = self.bitmap.clear(chunk) {
                        self.next_meta.pages.insert(page);
                        cleared = true;
                    }
                }
            }
            if cleared {
                self.persist();
            }
        }
        self.flush_resynced(false);
        self.pump_resync();
    }
}
