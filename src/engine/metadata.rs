//! Metadata sequencing: every change to what must survive a crash (disk
//! state, generations, bitmap pages, activity log, witness record, the
//! lost-power mark) goes out as one `Action::PersistMeta` with the next
//! `MetaToken`, written in order by the shell; `meta_persisted` releases
//! what waited for it (requests, the durable view the peer is told).
//!
//! Owns `meta` (the sequence), `next_meta`, `pending_durable`, `durable`.

use super::*;

/// What the next metadata write carries besides the state.
#[derive(Debug, Default)]
pub(super) struct NextMeta {
    /// Bitmap pages changed since the last write.
    pub(super) pages: BTreeSet<u32>,
    /// A new activity-log snapshot (extents added).
    pub(super) activity_log: Option<AlSnapshot>,
    /// Flush the data disk before the write (see `start_tracking`).
    pub(super) flush_data: bool,
}

/// The metadata sequence: the last write issued and the last one durable.
#[derive(Debug, Default)]
pub(super) struct MetaSeq {
    /// The last token issued; None before the first metadata write.
    issued: Option<MetaToken>,
    /// The last token reported durable; never after `issued`.
    persisted: Option<MetaToken>,
}

impl MetaSeq {
    /// The next token.
    fn issue(&mut self) -> MetaToken {
        let token = MetaToken::next(self.issued);
        self.issued = Some(token);
        token
    }

    /// The last token issued (None: none yet).
    pub(super) fn last_issued(&self) -> Option<MetaToken> {
        self.issued
    }

    /// The last token reported durable (None: none yet).
    pub(super) fn last_persisted(&self) -> Option<MetaToken> {
        self.persisted
    }

    /// Whether the write of `token` (and every one before it) is durable.
    pub(super) fn is_durable(&self, token: MetaToken) -> bool {
        Some(token) <= self.persisted
    }

    /// Whether a write issued is not durable yet.
    pub(super) fn pending(&self) -> bool {
        self.issued > self.persisted
    }

    /// Every write up to `token` is durable.
    fn persisted_up_to(&mut self, token: MetaToken) {
        self.persisted = self.persisted.max(Some(token));
    }

    /// Nothing is left to wait for (no disk to write to).
    pub(super) fn all_persisted(&mut self) {
        self.persisted = self.issued;
    }
}

impl Engine {
    /// Whether metadata up to `token` is already durable (None: nothing to
    /// wait for).
    pub fn meta_durable(&self, token: Option<MetaToken>) -> bool {
        token.is_none_or(|t| self.meta.is_durable(t))
    }

    /// A new generation starts (writes this copy completes from now on are
    /// ones the peer lacks). The metadata write that records it flushes
    /// the data disk first: after a power cut this copy may then only have
    /// lost writes of the new generation, which no other copy holds; the
    /// older ones the peer may hold too are durable here, and a resync
    /// from this copy cannot undo them.
    pub(super) fn start_tracking(&mut self, id: u64) {
        self.gens.start_tracking(id);
        self.next_meta.flush_data = true;
    }

    /// Issues a metadata write of the current state (and the bitmap pages
    /// and activity-log snapshot waiting for one); its token.
    pub(super) fn persist(&mut self) -> MetaToken {
        let token = self.meta.issue();
        if self.disk == DiskState::Diskless {
            // No disk to write to: nothing can wait on it.
            self.next_meta.pages.clear();
            self.next_meta.activity_log = None;
            self.meta.all_persisted();
            self.pending_durable.clear();
            self.durable = (self.disk, self.gens);
            return token;
        }
        self.pending_durable
            .push_back((token, self.disk, self.gens));
        let pages = std::mem::take(&mut self.next_meta.pages)
            .into_iter()
            .map(|p| (p, Box::new(self.bitmap.page_bytes(p))))
            .collect();
        self.actions.push_back(Action::PersistMeta {
            token,
            disk: self.disk,
            generations: self.gens,
            primary: self.role == Role::Primary,
            pages,
            activity_log: self.next_meta.activity_log.take(),
            record: self.quorum.record,
            cache_lost: self.cache_lost,
            flush_data: std::mem::take(&mut self.next_meta.flush_data) && self.cfg.volatile_cache,
        });
        token
    }

    /// Metadata up to `token` is durable.
    pub fn meta_persisted(&mut self, token: MetaToken) {
        self.meta.persisted_up_to(token);
        let before = self.durable;
        while let Some(&(t, disk, gens)) = self.pending_durable.front()
            && self.meta.is_durable(t)
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
            .filter(|(_, r)| r.meta_token.is_some_and(|t| self.meta.is_durable(t)))
            .map(|(id, _)| *id)
            .collect();
        let has_disk = self.disk != DiskState::Diskless;
        let al_ready: Vec<RequestId> = self
            .table
            .requests
            .iter()
            .filter(|(_, r)| r.start_after.is_some_and(|t| self.meta.is_durable(t)))
            .map(|(id, _)| *id)
            .collect();
        for id in al_ready {
            if let Some(r) = self.table.requests.get_mut(&id) {
                r.start_after = None;
            }
            let replicating = self.replicating();
            self.start_legs(id, replicating, has_disk);
        }
        for id in ready {
            if let Some(r) = self.table.requests.get_mut(&id) {
                r.meta_token = None;
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
        if self.source.full_sync_announce && self.meta_durable(self.source.full_sync_token) {
            // Tell the target the base it may adopt (see `full_sync_base`).
            self.source.full_sync_announce = false;
            if before == self.durable {
                self.actions.push_back(Action::AnnounceState);
            }
        }
        if self.announce_after.is_some_and(|t| self.meta.is_durable(t)) {
            self.announce_after = None;
            self.actions.push_back(Action::AnnounceState);
        }
        if let Some(t) = self.source.sync_done_after
            && self.meta.is_durable(t)
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
            .filter(|(_, r)| r.meta_token.is_some())
            .map(|(id, _)| *id)
            .collect();
        for id in waiting {
            if let Some(r) = self.table.requests.get_mut(&id) {
                r.meta_token = None;
                r.local_deferred = false;
                if r.local == Leg::Unused {
                    r.local = Leg::Failed;
                }
            }
            self.try_complete(id);
        }
        self.after_event();
    }
}
