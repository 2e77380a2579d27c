//! Requests in flight and the overlap queue that serialises them (rule 5).

use std::collections::{BTreeMap, VecDeque};

use super::MetaToken;

/// Identifies one request in the engine. Client requests use ids chosen by
/// the shell (below `INTERNAL_ID_BASE`); the engine's own (resync) requests
/// use ids at or above it.
pub type RequestId = u64;

/// First id of engine-internal requests.
pub const INTERNAL_ID_BASE: RequestId = 1 << 63;

/// A byte range of the volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    /// First byte.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl Range {
    /// A range.
    pub fn new(offset: u64, len: u64) -> Self {
        Range { offset, len }
    }

    /// End (exclusive).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }

    /// Whether two ranges share a byte.
    pub fn overlaps(&self, other: &Range) -> bool {
        self.offset < other.end() && other.offset < self.end()
    }
}

/// What a request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Write data (the shell holds the buffer); `fua` = durable on completion.
    Write {
        /// Force unit access.
        fua: bool,
    },
    /// Make the range read back as zeros (TRIM and WRITE_ZEROES).
    Zeroes {
        /// Force unit access.
        fua: bool,
    },
    /// Make every completed write durable on every up-to-date node.
    Flush,
    /// Read through the peer (this node is diskless, or primary on a copy
    /// still being resynced), or locally when such a read was held back
    /// and this copy has become up to date meanwhile.
    Read,
    /// Copy one chunk to the peer (resync).
    ResyncChunk,
    /// Compare one chunk's digest with the peer's (online verify).
    VerifyChunk,
}

impl Op {
    /// The same write, durable on completion (other ops unchanged).
    pub fn with_fua(self) -> Op {
        match self {
            Op::Write { .. } => Op::Write { fua: true },
            Op::Zeroes { .. } => Op::Zeroes { fua: true },
            other => other,
        }
    }

    /// A write without FUA: completed is not yet durable.
    pub fn volatile_write(self) -> bool {
        matches!(self, Op::Write { fua: false } | Op::Zeroes { fua: false })
    }

    /// Whether the op changes data and so must hold its range exclusively.
    pub fn locks_range(self) -> bool {
        matches!(
            self,
            Op::Write { .. } | Op::Zeroes { .. } | Op::ResyncChunk | Op::VerifyChunk
        )
    }
}

/// Progress of one leg (local disk or peer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leg {
    /// This leg is not part of the request.
    Unused,
    /// Issued, not finished.
    Pending,
    /// Finished successfully.
    Done,
    /// Finished with an error.
    Failed,
}

/// One request the engine tracks.
#[derive(Clone, Debug)]
pub struct Request {
    /// What it does.
    pub op: Op,
    /// Where.
    pub range: Range,
    /// Local disk leg.
    pub local: Leg,
    /// Peer leg.
    pub peer: Leg,
    /// Metadata write that must be durable before the request proceeds
    /// (dirty bits covering it).
    pub meta_token: Option<MetaToken>,
    /// Local leg waits for `meta_token` before it is issued.
    pub local_deferred: bool,
    /// Started (holds its range), as opposed to queued.
    pub started: bool,
    /// Metadata write (an activity-log update) that must be durable
    /// before any leg is issued.
    pub start_after: Option<MetaToken>,
    /// Holds a reference on its activity-log extents.
    pub al_pinned: bool,
    /// Sent to the peer only, by a primary whose own copy is still being
    /// resynced (the peer, its sync source, applies and tracks it).
    pub forwarded: bool,
    /// A write forwarded by the peer (this node is its sync source).
    pub from_peer: bool,
    /// Its peer leg was acknowledged, and then the peer stopped receiving
    /// writes before a flush there covered it: its range is in the bitmap
    /// already, so it is not tracked as unflushed on the peer.
    pub peer_marked: bool,
    /// It was sent to the peer, which stopped receiving writes before the
    /// request finished: the peer may hold it, so it completes only once
    /// it is durable here too (a local flush after its local write), or a
    /// power cut here could make this copy, the newer one, resync older
    /// data over it.
    pub needs_local_flush: bool,
    /// Its peer leg was issued at least once. One that never was (the peer
    /// did not receive writes when it started) goes to the peer as soon as
    /// it would otherwise wait for the witness while the peer receives
    /// writes (see `Engine::try_complete`).
    pub peer_issued: bool,
}

impl Request {
    /// A request not started yet.
    pub fn new(op: Op, range: Range) -> Self {
        Request {
            op,
            range,
            local: Leg::Unused,
            peer: Leg::Unused,
            meta_token: None,
            local_deferred: false,
            started: false,
            start_after: None,
            al_pinned: false,
            forwarded: false,
            from_peer: false,
            peer_marked: false,
            needs_local_flush: false,
            peer_issued: false,
        }
    }
}

/// Requests in flight plus the FIFO of those waiting for an overlapping
/// earlier request to finish.
#[derive(Default, Debug)]
pub struct RequestTable {
    /// Every tracked request by id.
    pub requests: BTreeMap<RequestId, Request>,
    queue: VecDeque<RequestId>,
}

impl RequestTable {
    /// Whether `range` conflicts with a started locking request, or with a
    /// queued one (to keep FIFO order among overlapping writes).
    fn conflicts(&self, id: RequestId, range: &Range) -> bool {
        self.requests.iter().any(|(other, r)| {
            *other != id && r.op.locks_range() && r.range.overlaps(range) && r.started
        }) || self.queue.iter().take_while(|q| **q != id).any(|q| {
            self.requests
                .get(q)
                .is_some_and(|r| r.range.overlaps(range))
        })
    }

    /// Adds a request; returns true when it may start now.
    pub fn insert(&mut self, id: RequestId, mut req: Request) -> bool {
        let may_start = !req.op.locks_range() || !self.conflicts(id, &req.range);
        req.started = may_start;
        self.requests.insert(id, req);
        if !may_start {
            self.queue.push_back(id);
        }
        may_start
    }

    /// Removes a finished request; returns the queued ids that may start now,
    /// in FIFO order.
    pub fn remove(&mut self, id: RequestId) -> Vec<RequestId> {
        self.requests.remove(&id);
        let mut ready = Vec::new();
        let mut i = 0;
        while i < self.queue.len() {
            let qid = self.queue[i];
            let Some(range) = self.requests.get(&qid).map(|r| r.range) else {
                self.queue.remove(i);
                continue;
            };
            if self.conflicts(qid, &range) {
                i += 1;
            } else {
                self.queue.remove(i);
                if let Some(r) = self.requests.get_mut(&qid) {
                    r.started = true;
                }
                ready.push(qid);
            }
        }
        ready
    }

    /// Number of tracked requests.
    pub fn len(&self) -> usize {
        self.requests.len()
    }

    /// True when nothing is tracked.
    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(offset: u64, len: u64) -> Request {
        Request {
            local: Leg::Pending,
            peer: Leg::Pending,
            started: true,
            ..Request::new(Op::Write { fua: false }, Range::new(offset, len))
        }
    }

    #[test]
    fn overlapping_writes_wait_in_fifo_order() {
        let mut t = RequestTable::default();
        assert!(t.insert(1, w(0, 8192)));
        let mut q = w(4096, 4096);
        q.started = false;
        assert!(!t.insert(2, q.clone()));
        assert!(!t.insert(3, q.clone()));
        assert!(t.insert(4, w(8192, 4096)));
        // 3 must not overtake 2 even though only 2 conflicts with it.
        assert_eq!(t.remove(1), vec![2]);
        assert_eq!(t.remove(2), vec![3]);
        assert_eq!(t.remove(3), Vec::<u64>::new());
    }

    #[test]
    fn flushes_never_wait() {
        let mut t = RequestTable::default();
        assert!(t.insert(1, w(0, 4096)));
        let mut f = w(0, 0);
        f.op = Op::Flush;
        assert!(t.insert(2, f));
    }
}
