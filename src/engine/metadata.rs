//! Metadata sequencing: every change to what must survive a crash (disk
//! state, generations, bitmap pages, activity log, witness record, the
//! lost-power mark) goes out as one `Action::PersistMeta` with the next
//! `MetaToken`, written in order by the shell; `meta_persisted` releases
//! what waited for it (requests, the durable view the peer is told).
//!
//! Owns `meta_issued`, `meta_persisted`, `pending_durable`, `durable`,
//! `pages_to_persist`, `al_to_persist`, `meta_flush_data`.

use super::*;

impl Engine {
    /// Whether metadata up to `token` is already durable.
    pub fn meta_durable(&self, token: u64) -> bool {
        token <= self.meta_persisted
    }

    /// A new generation starts (writes this copy completes from now on are
    /// ones the peer lacks). The metadata write that records it flushes
    /// the data disk first: after a power cut this copy may then only have
    /// lost writes of the new generation, which no other copy holds; the
    /// older ones the peer may hold too are durable here, and a resync
    /// from this copy cannot undo them.
    pub(super) fn start_tracking(&mut self, id: u64) {
        self.gens.start_tracking(id);
        self.meta_flush_data = true;
    }

    pub(super) fn persist(&mut self) -> u64 {
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
}
