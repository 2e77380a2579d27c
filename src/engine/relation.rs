//! The relation to the peer: its state messages, the negotiation that
//! picks a relation from both views and the witness record (`renegotiate`,
//! over the pure decisions in `negotiate`), the full-sync base a
//! target adopts, and what a lost link leaves behind.

use super::*;

impl Engine {
    /// The peer's state arrived (first time after connecting, or changed).
    pub fn peer_state(&mut self, view: NodeView) {
        if self.cfg.quorum.is_some() && view.record.epoch > self.quorum.record.epoch {
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

    pub(super) fn renegotiate(&mut self) {
        let Some((view, old)) = self.peer else { return };
        self.trust_the_witness_over_a_stalled_sync(&view);
        let mut new = negotiate(
            &self.view(),
            &view,
            self.cfg.tie_winner,
            self.peer_dirty.is_some(),
        );
        if let Some(forced) = witness_direction(
            &self.view(),
            &view,
            new,
            self.cfg.quorum.is_some(),
            self.cfg.tie_winner,
            self.peer_dirty.is_some(),
        ) {
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
                    self.next_meta.pages.extend(pages);
                    self.source.full_sync_token = Some(self.persist());
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
                self.next_meta.pages.extend(pages);
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
    pub(super) fn trust_the_witness_over_a_stalled_sync(&mut self, view: &NodeView) {
        if self.disk != DiskState::Inconsistent
            || view.disk != DiskState::Inconsistent
            || self.role != Role::Secondary
            || self.cfg.quorum.is_none()
            || self.quorum.record.epoch == 0
            || !self.quorum.record.me_up_to_date
            || self.quorum.record.peer_up_to_date
            || self.quorum.record.forced
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
        self.target.done_flush_waits = false;
        self.peer = None;
        self.peer_dirty = None;
        self.announce_after = None;
        // Writes it acknowledged but never flushed (issue 13, hole 1).
        self.peer_acks_lost();
        self.after_event();
    }

    /// The base generation of a running full sync from this node once the
    /// bitmap marking every chunk is durable (0 otherwise).
    pub(super) fn full_sync_base(&self) -> u64 {
        let full = matches!(
            self.peer,
            Some((_, Relation::SyncSource { full: true, .. }))
        );
        if full
            && self.source.pass.is_some()
            && self
                .source
                .full_sync_token
                .is_some_and(|t| self.meta.is_durable(t))
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
    pub(super) fn adopt_full_sync_base(&mut self) {
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
}
