//! What the engine relies on between events, asserted (TigerBeetle style):
//! `check_invariants` runs at the end of the public mutators and after every
//! step of the simulator, in builds with debug assertions. A failure is a
//! bug in the engine, never a condition of the outside world.

use super::Engine;

impl Engine {
    /// Panics when the engine's state breaks a rule the code relies on.
    /// Compiled to nothing without debug assertions.
    pub fn check_invariants(&self) {
        if !cfg!(debug_assertions) {
            return;
        }
        // Metadata sequencing: nothing is durable that was not issued, and
        // every token the engine waits on was issued.
        assert!(
            self.meta_persisted <= self.meta_issued,
            "metadata persisted up to {} but only {} issued",
            self.meta_persisted,
            self.meta_issued
        );
        for (what, token) in [
            ("activity-log snapshot", self.al_token),
            ("full-sync marking", self.full_sync_token),
            ("sync done", self.sync_done_after.unwrap_or(0)),
            ("announcement", self.announce_after.unwrap_or(0)),
            ("export", self.export_after.unwrap_or(0)),
        ] {
            assert!(
                token <= self.meta_issued,
                "waits for {what} metadata write {token}, only {} issued",
                self.meta_issued
            );
        }
        let mut previous = self.meta_persisted;
        for &(token, _, _) in &self.pending_durable {
            assert!(
                token > previous,
                "pending durable states out of order or already durable: {token} after {previous}"
            );
            previous = token;
        }
        // Every request the engine holds back is one it tracks. (The
        // sync-done and resync flushes are internal ids outside the table.)
        let tracked = |id: &u64| self.table.requests.contains_key(id);
        for (what, id) in self
            .frozen
            .iter()
            .map(|id| ("frozen", id))
            .chain(
                self.quorum_waiters
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
