//! The lease gate of rule 7 in the volume task: every tick the lease is
//! checked (a primary without one holds or fails its I/O, see
//! `client::submit`, and resumes it once a lease is back), and the witness
//! record the engine decides on is kept current.

use super::Shell;
use crate::engine::Role;

impl Shell {
    /// The witness's record, as read or as a heartbeat returned it.
    pub(super) fn witness_record(&mut self, record: &crate::quorum::Record) {
        let view = self.view_of(record);
        self.engine.witness_record(view);
    }

    /// The witness answered a change the engine asked for (None: it failed).
    pub(super) fn witness_changed(&mut self, record: Option<&crate::quorum::Record>) {
        let view = record.map(|r| self.view_of(r));
        self.engine.witness_change_done(view);
    }

    /// Periodic (with a witness): retries, and the lease check of rule 7.
    pub(super) fn tick(&mut self) {
        self.engine.tick();
        let Some(lease) = self.lease.clone() else {
            return;
        };
        // What the next heartbeat tells the witness (at most one tick old:
        // a stale claim carries an older epoch, which the witness ignores).
        lease.set_claim(self.engine.claim());
        let primary = self.engine.status_role() == Role::Primary;
        let valid = lease.valid();
        if primary && !valid && !self.lease_lapsed {
            self.lease_lapsed = true;
            tracing::error!(
                "volume {}: no lease from the witness or from {}: I/O {} until one answers",
                self.name,
                self.peer_name,
                if lease.policy == crate::quorum::NoQuorumPolicy::IoError {
                    "fails"
                } else {
                    "is suspended"
                }
            );
            (self.events)(&self.name, "quorum-lost");
        }
        if (valid || !primary) && self.lease_lapsed {
            self.lease_lapsed = false;
            tracing::info!("volume {}: lease regained; I/O resumes", self.name);
            (self.events)(&self.name, "quorum-regained");
        }
        if (valid || !primary) && !self.held_for_lease.is_empty() {
            for input in std::mem::take(&mut self.held_for_lease) {
                self.handle_input(input);
            }
        }
    }

    pub(super) fn view_of(&self, record: &crate::quorum::Record) -> crate::quorum::RecordView {
        crate::quorum::RecordView::of(record, &self.node, &self.peer_name)
    }
}
