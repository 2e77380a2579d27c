//! This node as the sync target of its peer: the end of a resync into it
//! (the local flush before it takes the source's generations) and what it
//! remembers of a resync cut short. The target's data path (which frames it
//! accepts) is `Engine::accepts_peer_writes` and `accepts_resync_writes`.

use super::{Action, Engine, NodeView, Notice, Op, Range, Relation, RequestId};
use crate::meta::{DiskState, Generations};

/// What the sync target keeps; each field says when it is meaningful.
#[derive(Debug, Default)]
pub(super) struct SyncTarget {
    /// As a sync target told the resync is done: the local flush that
    /// makes the resynced data durable first, and the source's generations.
    /// None otherwise (and after a disconnect: the source tells again).
    pub(super) done_flush: Option<(RequestId, Generations)>,
    /// Meaningful while `done_flush` is set: that flush waits for the
    /// peer's requests this node is still applying (resync data accepted
    /// before "sync done", maybe of a pass the source gave up) to land, so
    /// that it covers them and none lands after this copy is up to date and
    /// writes on its own.
    pub(super) done_flush_waits: bool,
    /// Meaningful while this copy is Inconsistent and its sync source is
    /// gone: what the source still had to copy into it by its last state
    /// message (its dirty chunks then: an upper bound, as the resync only
    /// shrinks them). None when no resync into this copy was seen since the
    /// node started, or once a peer is connected again.
    pub(super) interrupted_missing_bytes: Option<u64>,
}

impl SyncTarget {
    /// The link to `source` dropped while this node was its target: keep
    /// what it still had to copy, for an operator who would force this copy
    /// (`PromoteError`'s message). The pending "sync done" flush, if any, is
    /// dropped by the caller for every relation.
    pub(super) fn on_disconnect(&mut self, source: &NodeView, chunk_bytes: u64, data_bytes: u64) {
        self.interrupted_missing_bytes = Some(
            source
                .dirty_chunks
                .saturating_mul(chunk_bytes)
                .min(data_bytes),
        );
    }
}

impl Engine {
    /// The peer finished resyncing this node from `source` generations.
    /// The resync data (and a forwarding primary's own writes) were written
    /// without FUA: a local flush makes them durable before this copy
    /// calls itself up to date.
    pub fn peer_sync_done(&mut self, source: Generations) {
        if !matches!(self.peer, Some((_, Relation::SyncTarget))) || self.target.done_flush.is_some()
        {
            return;
        }
        let id = self.internal_id();
        self.target.done_flush = Some((id, source));
        self.target.done_flush_waits = self.replicas_in_flight > 0;
        if !self.target.done_flush_waits {
            self.issue_sync_done_flush(id);
        }
        self.check_invariants();
    }

    /// Issues the "sync done" flush `id`.
    pub(super) fn issue_sync_done_flush(&mut self, id: RequestId) {
        self.actions.push_back(Action::LocalIo {
            id,
            op: Op::Flush,
            range: Range::new(0, 0),
        });
    }

    /// The flush before taking the source's generations finished.
    pub(super) fn sync_done_flushed(&mut self, source: Generations, ok: bool) {
        if !ok {
            self.local_disk_failed();
            return self.after_event();
        }
        if !matches!(self.peer, Some((_, Relation::SyncTarget))) {
            return;
        }
        self.gens.sync_target_done(&source);
        self.disk = DiskState::UpToDate;
        // This copy now equals the source: nothing of ours is out of sync.
        let pages = self.bitmap.clear_all();
        self.next_meta.pages.extend(pages);
        if let Some((v, _)) = self.peer {
            self.peer = Some((v, Relation::InSync));
        }
        let token = self.persist();
        self.announce_after = Some(token);
        self.actions.push_back(Action::Notify(Notice::ResyncDone));
        self.after_event();
    }
}
