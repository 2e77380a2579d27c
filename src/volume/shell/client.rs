//! Client requests in the volume task: the lease gate of rule 7 (no lease,
//! no service), then the engine; the data of completed reads.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;

use super::Shell;
use crate::engine::{Op, Range, Role};
use crate::store::AlignedBuf;
use crate::volume::{Input, VolumeError};

/// Where a request's answer goes.
pub(super) type Reply = oneshot::Sender<Result<Option<AlignedBuf>, VolumeError>>;

impl Shell {
    /// A client request: refused while detaching, held (or failed) while
    /// a primary has no lease, else given to the engine.
    pub(super) fn submit(
        &mut self,
        op: Op,
        range: Range,
        buf: Option<Arc<AlignedBuf>>,
        reply: Reply,
    ) {
        if self.detaching.is_some() {
            let _ = reply.send(Err(VolumeError::Detached));
            return;
        }
        if let Some(l) = &self.lease
            && self.engine.status_role() == Role::Primary
            && (!l.valid() || !self.held_for_lease.is_empty())
        {
            // Rule 7: no lease, no service.
            if l.policy == crate::quorum::NoQuorumPolicy::IoError {
                let _ = reply.send(Err(crate::engine::IoFailure::NoQuorum.into()));
            } else {
                self.held_for_lease.push_back(Input::Submit {
                    op,
                    range,
                    buf,
                    reply,
                });
            }
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        if let Some(b) = buf {
            self.bufs.insert(id, b);
        }
        if matches!(op, Op::Write { .. } | Op::Zeroes { .. }) {
            self.write_started.insert(id, (Instant::now(), range.len));
        }
        self.waiters.insert(id, reply);
        self.engine.submit(id, op, range);
    }

    /// A local read finished (None: it failed).
    pub(super) fn local_read_done(&mut self, id: u64, data: Option<AlignedBuf>) {
        let ok = data.is_some();
        if let Some(d) = data {
            self.read_results.insert(id, d);
        }
        self.engine.local_done(id, ok);
    }

    /// A peer I/O finished (with the data of a read the peer served).
    pub(super) fn peer_done(&mut self, id: u64, ok: bool, data: Option<AlignedBuf>) {
        if let Some(d) = data {
            self.read_results.insert(id, d);
        }
        self.engine.peer_done(id, ok);
    }
}
