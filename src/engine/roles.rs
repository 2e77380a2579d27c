//! Roles: promotion (and its checks, rule 3), demotion, and discarding the
//! local copy to resolve a split brain (rule 4).

use super::*;

impl Engine {
    /// Split-brain resolution on the victim: forget this node's data history
    /// (its copy becomes Inconsistent) so that the peer overwrites it with a
    /// full resync. Refused while primary.
    pub fn discard_local(&mut self) -> Result<MetaToken, MaintenanceError> {
        if self.role == Role::Primary {
            return Err(MaintenanceError::IsPrimary);
        }
        self.disk = DiskState::Inconsistent;
        self.gens = Generations::default();
        let pages = self.bitmap.clear_all();
        self.next_meta.pages.extend(pages);
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

    /// Makes this node primary. Returns the metadata write to wait for
    /// (None: nothing to wait for).
    pub fn promote(&mut self, force: bool) -> Result<Option<MetaToken>, PromoteError> {
        if self.role == Role::Primary {
            return Ok(self.meta.last_issued());
        }
        self.promote_check(force)?;
        debug_assert!(
            !self.promote_waits_for_replicas(),
            "promoted while {} requests of the old primary are still landing",
            self.replicas_in_flight
        );
        if self.promotion_is_forced() {
            // Forced: this copy starts a new data history, marked forced so
            // that it never passes for one holding every acknowledged write.
            assert!(force, "only a forced promotion starts a new history");
            let id = self.fresh_id();
            self.gens.start_new_history(id);
            self.next_meta.flush_data = true;
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
        if self.meta.is_durable(token) {
            self.actions.push_back(Action::Export(true));
        } else {
            self.export_after = Some(token);
        }
        self.check_invariants();
        Ok(Some(token))
    }

    pub(super) fn release_export(&mut self) {
        if let Some(t) = self.export_after
            && self.meta.is_durable(t)
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

    /// Makes this node secondary. Returns the metadata write to wait for
    /// (None: nothing to wait for).
    pub fn demote(&mut self) -> Result<Option<MetaToken>, DemoteError> {
        if self.role == Role::Secondary {
            return Ok(self.meta.last_issued());
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
        Ok(Some(token))
    }
}
