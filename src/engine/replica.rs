//! The replica side of the engine: which requests from the peer this node
//! applies to its copy (`accepts_peer_request`), and what waits for the
//! requests being applied to land: a new connection (none of the old one's
//! writes may land after a resync of the same range) and a promotion (none
//! may land after this node's own writes). The shell and the simulator
//! both ask it, so the simulator runs the decisions the daemon makes.
//! Writes the peer forwards to its sync source are `forward`.
//!
//! Owns `replicas_in_flight`.

use super::*;

/// A request from the peer, as far as the decision to apply it goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerRequest {
    /// A mirrored write or zeroing (`resync`: resync data).
    Write {
        /// Resync data, as opposed to a mirrored client write.
        resync: bool,
    },
    /// A flush of what this copy applied.
    Flush,
    /// The digest of a range (checksum-based resync).
    Digest {
        /// Sent by a sync source.
        resync: bool,
    },
    /// A read (this node is the mirror or the sync source of a primary).
    Read,
}

impl Engine {
    /// Whether writes received from the peer (mirrored writes, resync data)
    /// may be applied here.
    pub(super) fn accepts_peer_writes(&self) -> bool {
        (self.role == Role::Secondary || self.forwarding())
            && self.disk != DiskState::Diskless
            && matches!(
                self.peer,
                Some((
                    _,
                    Relation::InSync | Relation::SyncTarget | Relation::ServingDiskless
                ))
            )
    }

    /// Whether resync data from the peer may be applied here: as its
    /// mirrored writes may, but not once it said the resync is done. Data
    /// sent after that belongs to a pass it started on a state of this node
    /// older than the "sync done" (the link carries them in that order): it
    /// could still be in flight here when this node, done, writes on its own
    /// over the same range, and land last (seed 57801). The source keeps such
    /// a refused chunk marked and copies it in a later pass.
    pub(super) fn accepts_resync_writes(&self) -> bool {
        self.accepts_peer_writes() && self.target.done_flush.is_none()
    }

    /// Whether reads and flushes from the peer are served here: as its
    /// mirror, or as the sync source of a primary whose own copy is still
    /// being resynced.
    pub(super) fn serves_peer_reads(&self) -> bool {
        self.disk == DiskState::UpToDate
            && (self.accepts_peer_writes() || self.accepts_forwarded_writes())
    }

    /// The shell started applying a request from the peer (or answering
    /// one it refused): it lands, or is answered, with `replica_finished`.
    pub fn replica_started(&mut self) {
        self.replicas_in_flight += 1;
    }

    /// A request from the peer has landed (or was answered).
    pub fn replica_finished(&mut self) {
        assert!(
            self.replicas_in_flight > 0,
            "a replica request finished that never started"
        );
        self.replicas_in_flight -= 1;
        if self.replicas_in_flight == 0
            && self.target.done_flush_waits
            && let Some((id, _)) = self.target.done_flush
        {
            // The resync data in flight has landed: the "sync done" flush
            // now covers it.
            self.target.done_flush_waits = false;
            self.issue_sync_done_flush(id);
        }
        self.check_invariants();
    }

    /// Requests from the peer being applied now.
    pub fn replicas_in_flight(&self) -> usize {
        self.replicas_in_flight
    }

    /// Whether a new connection to the peer must wait (before its first
    /// state is applied) for the requests of the old one to land: one of
    /// them landing after a resync chunk of the same range would undo it.
    pub fn new_link_waits_for_replicas(&self) -> bool {
        self.replicas_in_flight > 0
    }

    /// Whether a promotion must wait for the requests from the peer (the
    /// old primary) to land: none may land after this node's own writes.
    /// A promotion into a forwarding primary does not wait: it writes its
    /// own copy only in order with its sync source (see `forward`).
    pub fn promote_waits_for_replicas(&self) -> bool {
        self.replicas_in_flight > 0 && !self.promotes_by_forwarding()
    }

    /// Whether this node applies `req` from the peer now. (Whether the
    /// request came on the current connection, and whether its range is
    /// valid, the shell checks first.) A flush is served to a peer whose
    /// writes this node applies, and to a primary this node serves reads.
    pub fn accepts_peer_request(&self, req: PeerRequest) -> bool {
        match req {
            PeerRequest::Write { resync: true } | PeerRequest::Digest { resync: true } => {
                self.accepts_resync_writes()
            }
            PeerRequest::Write { resync: false } | PeerRequest::Digest { resync: false } => {
                self.accepts_peer_writes()
            }
            PeerRequest::Flush => self.accepts_peer_writes() || self.serves_peer_reads(),
            PeerRequest::Read => self.serves_peer_reads(),
        }
    }
}
