//! What the engine relies on between events, asserted (TigerBeetle style):
//! `check_invariants` runs at the end of the public mutators (in
//! `after_event` for those that post-process, explicitly in the others) and
//! after every step of the simulator, in builds with debug assertions, so
//! the daemon's debug builds in the integration tests run it too. A failure
//! is a bug in the engine, never a condition of the outside world.
//!
//! Not checked after: the attach-time setters (`set_cache_lost`,
//! `power_lost`, `set_record`, `continue_activity_log`: single fields, before
//! any event), `peer_dirty_runs` (always followed by `peer_state`, which
//! checks), and `poll_action` (takes an action off the queue).

use super::{Engine, FORWARDED_WRITES_MAX, INTERNAL_ID_BASE, Leg, Op, RESYNC_WINDOW, Relation};

impl Engine {
    /// Panics when the engine's state breaks a rule the code relies on.
    /// Compiled to nothing without debug assertions.
    pub fn check_invariants(&self) {
        if !cfg!(debug_assertions) {
            return;
        }
        // Metadata sequencing: nothing is durable that was not issued, and
        // every token the engine waits on was issued.
        let issued = self.meta.last_issued();
        assert!(
            self.meta.last_persisted() <= issued,
            "metadata persisted up to {:?} but only {issued:?} issued",
            self.meta.last_persisted(),
        );
        for (what, token) in [
            ("activity-log snapshot", self.al_token),
            ("full-sync marking", self.source.full_sync_token),
            ("sync done", self.source.sync_done_after),
            ("announcement", self.announce_after),
            ("export", self.export_after),
        ] {
            assert!(
                token <= issued,
                "waits for {what} metadata write {token:?}, only {issued:?} issued"
            );
        }
        let mut previous = self.meta.last_persisted();
        for &(token, _, _) in &self.pending_durable {
            assert!(
                Some(token) > previous,
                "pending durable states out of order or already durable: {token} after {previous:?}"
            );
            previous = Some(token);
        }
        // A resync pass exists only while this node is the sync source, and
        // keeps its requests within the window.
        if let Some(pass) = &self.source.pass {
            assert!(
                matches!(self.peer, Some((_, Relation::SyncSource { .. }))),
                "a resync pass is running but the relation is {:?}",
                self.peer.map(|(_, r)| r)
            );
            assert!(
                pass.inflight <= RESYNC_WINDOW,
                "{} resync requests in flight, window {RESYNC_WINDOW}",
                pass.inflight
            );
        }
        // A forwarding primary writes its own copy only after the sync
        // source has the write (the source's copy is the complete one; see
        // `has_local_client_writes`).
        for (id, r) in &self.table.requests {
            if r.forwarded && matches!(r.op, Op::Write { .. } | Op::Zeroes { .. }) {
                assert!(
                    r.local == Leg::Unused || r.peer == Leg::Done,
                    "forwarded write {id} issued locally (local {:?}) before the source had it (peer {:?})",
                    r.local,
                    r.peer
                );
            }
        }
        // So does a verify pass (the shell bounds client requests with its
        // permits, the link the forwarded ones).
        if let Some(v) = &self.verify {
            assert!(
                v.inflight <= RESYNC_WINDOW,
                "{} verify requests in flight, window {RESYNC_WINDOW}",
                v.inflight
            );
        }
        // The request table is bounded: client requests by the shell's
        // permits, forwarded writes by their own bound, the engine's own
        // by the resync and verify windows and its one flush.
        let (mut clients, mut forwarded, mut internal) = (0, 0, 0);
        for (id, r) in &self.table.requests {
            if r.from_peer {
                forwarded += 1;
            } else if *id < INTERNAL_ID_BASE {
                clients += 1;
            } else {
                internal += 1;
            }
        }
        assert!(
            clients <= self.cfg.client_requests_max,
            "{clients} client requests in the table, {} permits",
            self.cfg.client_requests_max
        );
        assert!(
            forwarded <= FORWARDED_WRITES_MAX,
            "{forwarded} forwarded writes held, bound {FORWARDED_WRITES_MAX}"
        );
        assert!(
            internal <= 2 * RESYNC_WINDOW + 1,
            "{internal} internal requests in the table (resync and verify windows {RESYNC_WINDOW}, one flush)"
        );
        // Every request the engine holds back is one it tracks. (The
        // sync-done and resync flushes are internal ids outside the table.)
        let tracked = |id: &u64| self.table.requests.contains_key(id);
        for (what, id) in self
            .frozen
            .iter()
            .map(|id| ("frozen", id))
            .chain(
                self.quorum
                    .waiters
                    .iter()
                    .map(|id| ("waiting for quorum", id)),
            )
            .chain(
                self.al_waiting
                    .iter()
                    .map(|id| ("waiting for the activity log", id)),
            )
            .chain(
                self.engine_flush
                    .iter()
                    .map(|id| ("the engine's flush", id)),
            )
        {
            assert!(tracked(id), "request {id} is {what} but not tracked");
        }
    }
}
