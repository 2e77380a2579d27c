//! The write path (and reads the peer serves): a client request enters the
//! table (`submit`), waits for overlaps, the activity log and metadata,
//! then gets its legs (local, peer, both); each leg's completion
//! (`local_done`, `peer_done`) may complete it (`try_complete`) and
//! `finish` settles what it leaves behind (unflushed tracking, marks,
//! activity-log pins). A failed leg marks the bitmap or fails the request.
//!
//! The request table and its leg states are `request`; forwarding through
//! a sync source is `forward`.

use super::*;

impl Engine {
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

    pub(super) fn start(&mut self, id: RequestId) {
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
                            self.next_meta.activity_log = Some(snap);
                            self.al_token = Some(self.persist());
                        }
                    }
                    Err(_) => {
                        // Every extent of the log is busy: wait for one to free.
                        self.al_waiting.push_back(id);
                        return;
                    }
                }
            }
            if !self.meta_durable(self.al_token) {
                if let Some(r) = self.table.requests.get_mut(&id) {
                    r.start_after = self.al_token;
                }
                return;
            }
        }
        self.start_legs(id, replicating, has_disk);
    }

    pub(super) fn start_legs(&mut self, id: RequestId, replicating: bool, has_disk: bool) {
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
        let mut token = None;
        if op != Op::Read && op != Op::Flush && !replicating && has_disk {
            let pages = self.bitmap.set_range(range.offset, range.len);
            if !pages.is_empty() {
                self.next_meta.pages.extend(pages);
                token = Some(self.persist());
            } else if self.meta.pending() {
                // Earlier bits (or the generation change) are still on their way.
                token = self.meta.last_issued();
            }
        }
        if op == Op::Flush && !replicating && has_disk && self.meta.pending() {
            // A flush that completes without the peer promises durability
            // on this copy alone: only once this copy is the newer one on
            // disk (the generation change), or after a power cut here the
            // peer's copy, which may lack what it covers, would be chosen.
            token = self.meta.last_issued();
        }
        // In sync again, but the witness does not list the peer yet: the
        // record names this copy alone as holding every acknowledged write,
        // so a power cut here must not lose one the peer holds too.
        let alone_at_witness = self.cfg.quorum.is_some()
            && self.quorum.record.epoch > 0
            && !self.quorum.record.peer_up_to_date
            && replicating;
        let Some(r) = self.table.requests.get_mut(&id) else {
            return;
        };
        r.meta_token = token;
        if alone_at_witness && op.volatile_write() {
            r.needs_local_flush = true;
        }
        if op != Op::Read && has_disk {
            if token.is_some() {
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

    /// Sends `op` on `range` to the peer for request `id`.
    pub(super) fn send_to_peer(&mut self, id: RequestId, op: Op, range: Range, forward: bool) {
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

    pub(super) fn try_complete(&mut self, id: RequestId) {
        if self.frozen.contains(&id) {
            return;
        }
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
            || !self.meta_durable(r.meta_token)
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
            if self.quorum.lost && self.cfg.quorum == Some(NoQuorumPolicy::IoError) {
                self.quorum.waiters.remove(&id);
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
            self.quorum.waiters.insert(id);
            return;
        }
        self.quorum.waiters.remove(&id);
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

    pub(super) fn finish(&mut self, id: RequestId) {
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

    pub(super) fn has_client_requests(&self) -> bool {
        self.table
            .requests
            .keys()
            .next()
            .is_some_and(|id| *id < INTERNAL_ID_BASE)
    }

    /// Whether a client write may still land on the local disk. A primary
    /// forwarding to its sync source writes nothing locally; a secondary
    /// (a fenced primary) counts every client request it still holds.
    pub(super) fn has_local_client_writes(&self) -> bool {
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
    pub(super) fn peer_leg_lost(&mut self, id: RequestId) {
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
                    self.next_meta.pages.extend(pages);
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
            self.next_meta.pages.extend(pages);
            let token = self.persist();
            if let Some(r) = self.table.requests.get_mut(&id) {
                r.meta_token = Some(token);
            }
        }
    }

    /// Fails every request of `ids` with `why`.
    pub(super) fn fail_requests(&mut self, ids: BTreeSet<RequestId>, why: IoFailure) {
        for id in ids {
            self.actions.push_back(Action::Complete {
                id,
                result: Err(why),
            });
            self.finish(id);
        }
    }

    /// A fresh id for a request of the engine's own.
    pub(super) fn internal_id(&mut self) -> RequestId {
        let id = self.next_internal;
        self.next_internal += 1;
        id
    }

    /// Tracks an engine-internal request for one whole chunk (resync or
    /// verify); returns its id and whether it may start now.
    pub(super) fn insert_chunk_request(
        &mut self,
        op: Op,
        chunk: u64,
        count: u64,
    ) -> (RequestId, bool) {
        let offset = chunk * self.cfg.chunk_bytes;
        let len = (count * self.cfg.chunk_bytes).min(self.cfg.data_bytes - offset);
        let id = self.internal_id();
        (
            id,
            self.table
                .insert(id, Request::new(op, Range::new(offset, len))),
        )
    }

    /// The local disk failed outside a tracked request (e.g. a resync read).
    pub fn disk_failed(&mut self) {
        self.local_disk_failed();
        self.after_event();
    }

    pub(super) fn local_disk_failed(&mut self) {
        if self.disk == DiskState::Diskless {
            return;
        }
        self.disk = DiskState::Diskless;
        let done = self.unflushed.local_lost();
        self.release_pins(done);
        self.meta.all_persisted(); // nothing more can be persisted
        self.pending_durable.clear();
        self.durable = (DiskState::Diskless, self.gens);
        self.actions
            .push_back(Action::Notify(Notice::LocalDiskFailed));
        self.actions.push_back(Action::AnnounceState);
        self.renegotiate();
    }
}
