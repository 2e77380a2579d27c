//! Rules 2 and 3 as this node applies them: writes that wait for the
//! witness to outdate the peer, the witness record it holds and what it
//! claims, fencing when the record names the peer primary, and the
//! direction the record imposes on a resync (`witness_direction`). The
//! witness protocol and the record's types are `crate::quorum`.

use super::*;

impl Engine {
    /// Whether request `r`, complete on the local disk only, must wait for
    /// the witness to outdate the peer before it may complete.
    pub(super) fn needs_quorum(&self, r: &Request) -> bool {
        self.cfg.quorum.is_some()
            && !r.from_peer
            && !matches!(r.op, Op::Read | Op::ResyncChunk | Op::VerifyChunk)
            && r.peer != Leg::Done
            && (self.record.epoch == 0 || self.record.peer_up_to_date)
    }

    /// The peer is back and mirrors writes again: send it the writes that
    /// waited for quorum; each completes once the peer has it.
    pub(super) fn resend_quorum_waiters(&mut self) {
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
    pub(super) fn resend_to_peer(&mut self, id: RequestId) {
        let Some(r) = self.table.requests.get_mut(&id) else {
            return;
        };
        r.peer = Leg::Pending;
        let (op, range) = (r.op, r.range);
        self.send_to_peer(id, op, range, false);
    }

    /// Asks the witness for what the state needs, one change at a time.
    pub(super) fn want_witness(&mut self) {
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
                    r.meta_token = r.meta_token.max(Some(token));
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
    pub(super) fn fail_quorum_waiters(&mut self) {
        let ids = std::mem::take(&mut self.quorum_waiters);
        self.fail_requests(ids, IoFailure::NoQuorum);
    }

    /// The witness made the peer primary: stop being primary at once.
    pub(super) fn fence(&mut self) {
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
    pub(super) fn witness_direction(
        &self,
        view: &NodeView,
        negotiated: Relation,
    ) -> Option<Relation> {
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
            // Already its target: stay one (a refusal now would fail the
            // chunks in flight).
            if negotiated == Relation::SyncTarget {
                return None;
            }
            // The peer's state predates this record: it may be changing
            // already (into our sync target, on the record it knew), and a
            // copy outdated by this record that became the target of a copy
            // now Inconsistent would wait for good. The peer adopts the
            // record from our next state and announces; we decide on that.
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
}
