//! Rules 2 and 3 as this node applies them: writes that wait for the
//! witness to outdate the peer, the witness record it holds and what it
//! claims, and fencing when the record names the peer primary. The
//! direction the record imposes on a resync is `negotiate::witness_direction`;
//! the witness protocol and the record's types are `crate::quorum`.

use super::*;

/// This node's side of rules 2 and 3.
#[derive(Debug, Default)]
pub(super) struct QuorumState {
    /// The witness record as last seen (epoch 0: none seen yet).
    pub(super) record: RecordView,
    /// A change asked of the witness is unanswered (one at a time).
    pub(super) change_pending: bool,
    /// The last change failed: the next one is asked after the next tick.
    pub(super) change_backoff: bool,
    /// Requests complete without the peer that wait for the witness to
    /// outdate it before they may complete (rule 2).
    pub(super) waiters: BTreeSet<RequestId>,
    /// Requests wait and the witness did not answer: reported as quorum
    /// lost until it answers (or no longer lists the peer).
    pub(super) lost: bool,
}

impl Engine {
    /// Whether request `r`, complete on the local disk only, must wait for
    /// the witness to outdate the peer before it may complete.
    pub(super) fn needs_quorum(&self, r: &Request) -> bool {
        self.cfg.quorum.is_some()
            && !r.from_peer
            && !matches!(r.op, Op::Read | Op::ResyncChunk | Op::VerifyChunk)
            && r.peer != Leg::Done
            && (self.quorum.record.epoch == 0 || self.quorum.record.peer_up_to_date)
    }

    /// The peer is back and mirrors writes again: send it the writes that
    /// waited for quorum; each completes once the peer has it.
    pub(super) fn resend_quorum_waiters(&mut self) {
        for id in self.quorum.waiters.clone() {
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
        if self.cfg.quorum.is_none() || self.quorum.change_pending || self.quorum.change_backoff {
            return;
        }
        let rec = self.quorum.record;
        // Only a copy that is up to date on disk (not just in memory, as
        // right after a resync into a primary), with the generation it
        // writes under on disk too, may have the witness drop its peer:
        // after a crash it must still be the newer copy.
        let durable = self.durable.0 == DiskState::UpToDate && self.durable.1 == self.gens;
        let outdate = durable
            && (!self.quorum.waiters.is_empty()
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
        self.quorum.change_pending = true;
        self.actions.push_back(Action::WitnessChange {
            op,
            expected_epoch: rec.epoch,
        });
    }

    /// The witness answered a change: `Some(record)` when it was done or the
    /// epoch had moved on (decide again), `None` when it failed or was refused.
    pub fn witness_change_done(&mut self, outcome: Option<RecordView>) {
        self.quorum.change_pending = false;
        match outcome {
            Some(view) => {
                if self.quorum.lost {
                    self.quorum.lost = false;
                    self.actions
                        .push_back(Action::Notify(Notice::QuorumRegained));
                }
                self.witness_record(view);
            }
            None => {
                self.quorum.change_backoff = true;
                if !self.quorum.waiters.is_empty() && !self.quorum.lost {
                    self.quorum.lost = true;
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
        if self.cfg.quorum.is_none() || view.epoch < self.quorum.record.epoch {
            return;
        }
        if view != self.quorum.record {
            self.quorum.record = view;
            let token = self.persist();
            // Writes released by this record complete only once it is on
            // disk: after a crash this node still knows the peer missed them.
            for id in &self.quorum.waiters {
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
        if self.quorum.lost && !view.peer_up_to_date {
            self.quorum.lost = false;
            self.actions
                .push_back(Action::Notify(Notice::QuorumRegained));
        }
        for id in self.quorum.waiters.clone() {
            self.try_complete(id);
        }
        self.after_event();
    }

    /// Fails every write waiting for quorum with EIO.
    pub(super) fn fail_quorum_waiters(&mut self) {
        let ids = std::mem::take(&mut self.quorum.waiters);
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
                self.next_meta.pages.extend(pages);
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
        let view = if self.quorum.record.epoch > 0 {
            self.quorum.record
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
        self.quorum.record
    }
}
