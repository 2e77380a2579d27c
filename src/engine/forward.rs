//! Forwarding through a sync source: a primary whose own copy is still
//! being resynced (Inconsistent) sends every read and write to its up-to-date
//! peer and writes its own copy only after the source has a write; the sync
//! source serialises forwarded writes with its resync chunks. Requests are
//! held (`Engine::frozen`) while the source is unreachable or refuses them.
//!
//! Owns no fields of its own: `frozen` is the held requests' set.

use super::*;

impl Engine {
    /// Whether this node is (or just was) the sync source of a peer that
    /// may forward its writes here (applied through `submit_forwarded`).
    pub fn accepts_forwarded_writes(&self) -> bool {
        self.role == Role::Secondary
            && self.disk == DiskState::UpToDate
            && matches!(
                self.peer,
                Some((_, Relation::SyncSource { .. } | Relation::InSync))
            )
    }

    /// A write forwarded by the peer, a primary whose own copy this node is
    /// resyncing. It is serialised with the resync chunks like a client
    /// write (a chunk is read either wholly before it or after it has
    /// landed), and it completes (`Action::Complete` with the returned id:
    /// reply to the peer) once it is on this disk; the peer then writes it
    /// to its own copy. None: not the sync source now (the peer holds the
    /// write back and sends it again later).
    pub fn submit_forwarded(&mut self, op: Op, range: Range) -> Option<RequestId> {
        if !self.accepts_forwarded_writes() || !matches!(op, Op::Write { .. } | Op::Zeroes { .. }) {
            return None;
        }
        let held = self.table.requests.values().filter(|r| r.from_peer).count();
        if held >= FORWARDED_WRITES_MAX {
            // Bounded: the peer holds the write back and sends it again.
            return None;
        }
        let id = self.internal_id();
        let req = Request {
            from_peer: true,
            ..Request::new(op, range)
        };
        if self.table.insert(id, req) {
            self.start(id);
        }
        self.after_event();
        Some(id)
    }

    /// Primary on a copy that is still being resynced: it forwards every
    /// read and write to its sync source and writes nothing locally.
    pub(super) fn forwarding(&self) -> bool {
        self.role == Role::Primary && self.disk == DiskState::Inconsistent
    }

    /// Forwarding, and the sync source is connected and up to date.
    pub(super) fn forward_ready(&self) -> bool {
        self.forwarding()
            && matches!(
                self.peer,
                Some((v, Relation::SyncTarget))
                    if v.disk == DiskState::UpToDate && v.role == Role::Secondary
            )
    }

    /// Whether a promotion now would make this node a forwarding primary
    /// (a sync target whose up-to-date source is connected).
    /// Its Inconsistent state must be durable: after a crash it must not
    /// come back as an up-to-date copy of its old data.
    pub fn promotes_by_forwarding(&self) -> bool {
        self.role == Role::Secondary
            && self.disk == DiskState::Inconsistent
            && self.durable.0 == DiskState::Inconsistent
            && matches!(
                self.peer,
                Some((v, Relation::SyncTarget))
                    if v.disk == DiskState::UpToDate && v.role == Role::Secondary
            )
    }

    /// A forwarding primary's request goes to the sync source only, or is
    /// held back (frozen) until the source is reachable again: this copy
    /// cannot serve it, and no other copy may take over (safety first).
    pub(super) fn forward(&mut self, id: RequestId) {
        let ready = self.forward_ready();
        let Some(r) = self.table.requests.get_mut(&id) else {
            return;
        };
        if !ready {
            r.peer = Leg::Unused;
            self.frozen.insert(id);
            return;
        }
        self.frozen.remove(&id);
        r.peer = Leg::Pending;
        r.forwarded = true;
        let (op, range) = (r.op, r.range);
        self.send_to_peer(id, op, range, true);
        if op == Op::Flush {
            self.unflushed.close(id);
        }
    }

    /// Frozen requests proceed once they can: forwarded again when the
    /// sync source is back (`allow_forward`: only on news from the peer, so
    /// a source that refuses them is not asked again in a loop), or served
    /// as usual once this copy is up to date.
    pub(super) fn resume_frozen(&mut self, allow_forward: bool) {
        if self.frozen.is_empty() {
            return;
        }
        if self.forwarding() {
            if allow_forward && self.forward_ready() {
                for id in self.frozen.clone() {
                    self.forward(id);
                }
            }
            return;
        }
        if self.role != Role::Primary || self.disk != DiskState::UpToDate {
            return;
        }
        for id in std::mem::take(&mut self.frozen) {
            if let Some(r) = self.table.requests.get_mut(&id) {
                r.local = Leg::Unused;
                r.peer = Leg::Unused;
                r.forwarded = false;
                r.meta_token = None;
                r.local_deferred = false;
                self.start(id);
            }
        }
    }
}
