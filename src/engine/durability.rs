//! Completed writes that no flush has covered yet (rules 1 and 6 under a
//! power cut).
//!
//! A disk that completed a write without FUA may still hold it only in its
//! volatile cache: a power cut of that node can drop it. So the primary
//! keeps every completed write that is not yet durable on a copy that
//! acknowledged it, in epochs closed by flushes (DRBD's transfer log and
//! barriers):
//!
//! - A write enters the open epoch when it finishes, tagged with the legs
//!   that may still be volatile: `local` (this node's disk completed it
//!   without FUA) and `peer` (the peer acknowledged it without FUA).
//! - A flush issued on both legs closes the open epoch: it covers every
//!   write that finished before it was issued (the peer acknowledged those
//!   before the flush reached it, so its fdatasync covers them too). When it
//!   completes, the legs it succeeded on are durable for every closed epoch
//!   up to its own, and the writes durable on both legs leave.
//! - While a write is here it keeps its activity-log extents pinned: an
//!   extent leaves the activity log only once its writes are durable on both
//!   copies (rule 6), so a crash of this node still resyncs them.
//! - When the peer stops receiving writes (the link drops), every write the
//!   peer acknowledged but never flushed goes into the bitmap: the peer may
//!   lose it in a power cut, and the resync when it returns copies it again.
//!
//! Bounded: at most `UNFLUSHED_WRITES_MAX` writes or `UNFLUSHED_BYTES_MAX`
//! bytes wait for a flush before the engine issues one of its own.

use std::collections::VecDeque;

use super::request::{Range, RequestId};
use super::{Action, Engine, Leg, Op, Request};
use crate::meta::DiskState;

/// Writes that may wait for a flush before the engine flushes on its own.
pub const UNFLUSHED_WRITES_MAX: usize = 4096;
/// Bytes of writes that may wait for a flush before the engine flushes on
/// its own (what a secondary's power cut makes the next resync copy again,
/// at most, beyond the writes of one flush interval).
pub const UNFLUSHED_BYTES_MAX: u64 = 64 << 20;

/// One finished write not yet durable on every copy that has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnflushedWrite {
    /// Where it wrote.
    pub range: Range,
    /// This node's disk completed it without FUA and no flush covered it.
    pub local: bool,
    /// The peer acknowledged it without FUA and no flush there covered it.
    pub peer: bool,
}

impl UnflushedWrite {
    /// Durable on every copy: nothing to wait for.
    pub fn durable(&self) -> bool {
        !self.local && !self.peer
    }
}

/// The epochs of unflushed writes.
#[derive(Debug, Default)]
pub struct Unflushed {
    /// Finished since the newest flush was issued.
    open: Vec<UnflushedWrite>,
    /// Bytes of `open`.
    open_bytes: u64,
    /// Closed by a flush in flight (its id), oldest first.
    closed: VecDeque<(RequestId, Vec<UnflushedWrite>)>,
}

impl Unflushed {
    /// A write finished; `w` says which legs may still be volatile.
    pub fn add(&mut self, w: UnflushedWrite) {
        assert!(!w.durable(), "a durable write needs no tracking");
        self.open_bytes = self.open_bytes.saturating_add(w.range.len);
        self.open.push(w);
    }

    /// Whether no write waits for a flush.
    pub fn is_empty(&self) -> bool {
        self.open.is_empty() && self.closed.iter().all(|(_, e)| e.is_empty())
    }

    /// Whether writes finished since the newest flush was issued.
    pub fn has_open(&self) -> bool {
        !self.open.is_empty()
    }

    /// Whether the open epoch reached a bound (see the module doc).
    pub fn open_full(&self) -> bool {
        self.open.len() >= UNFLUSHED_WRITES_MAX || self.open_bytes >= UNFLUSHED_BYTES_MAX
    }

    /// Writes tracked in all epochs.
    pub fn len(&self) -> usize {
        self.open.len() + self.closed.iter().map(|(_, e)| e.len()).sum::<usize>()
    }

    /// A flush `id` was issued: it covers the open epoch.
    /// A flush issued again (it was held back and resent) covers what it
    /// covered before, and what finished since.
    pub fn close(&mut self, id: RequestId) {
        if let Some(pos) = self.closed.iter().position(|(f, _)| *f == id)
            && let Some((_, earlier)) = self.closed.remove(pos)
        {
            self.open.extend(earlier);
        }
        let epoch = std::mem::take(&mut self.open);
        self.open_bytes = 0;
        self.closed.push_back((id, epoch));
    }

    /// Flush `id` finished: `local_ok` / `peer_ok` say on which legs it
    /// succeeded. Every epoch closed up to `id` becomes durable on those
    /// legs (the flush was issued after they were closed). Returns the
    /// writes now durable everywhere (their activity-log pins may go);
    /// the others go back to the open epoch for the next flush.
    pub fn flushed(&mut self, id: RequestId, local_ok: bool, peer_ok: bool) -> Vec<UnflushedWrite> {
        let Some(pos) = self.closed.iter().position(|(f, _)| *f == id) else {
            return Vec::new();
        };
        let mut done = Vec::new();
        for (_, epoch) in self.closed.drain(..=pos) {
            for mut w in epoch {
                w.local &= !local_ok;
                w.peer &= !peer_ok;
                if w.durable() {
                    done.push(w);
                } else {
                    self.open_bytes = self.open_bytes.saturating_add(w.range.len);
                    self.open.push(w);
                }
            }
        }
        done
    }

    /// The peer will not flush what it acknowledged (it stopped receiving
    /// writes): returns the ranges to mark out of sync, and keeps only the
    /// local leg of each write. Writes that are then durable everywhere
    /// are returned in the second list.
    pub fn peer_lost(&mut self) -> (Vec<Range>, Vec<UnflushedWrite>) {
        let mut marked = Vec::new();
        let done = self.forget_leg(|w| {
            if w.peer {
                marked.push(w.range);
            }
            w.peer = false;
        });
        (marked, done)
    }

    /// This node's disk is gone (failed or detached): its legs no longer
    /// matter. Returns the writes then durable everywhere.
    pub fn local_lost(&mut self) -> Vec<UnflushedWrite> {
        self.forget_leg(|w| w.local = false)
    }

    /// Applies `forget` (which clears one leg) to every tracked write;
    /// removes and returns the writes that are then durable everywhere.
    fn forget_leg(&mut self, mut forget: impl FnMut(&mut UnflushedWrite)) -> Vec<UnflushedWrite> {
        let mut done = Vec::new();
        let epochs =
            std::iter::once(&mut self.open).chain(self.closed.iter_mut().map(|(_, epoch)| epoch));
        for epoch in epochs {
            epoch.retain_mut(|w| {
                forget(w);
                if w.durable() {
                    done.push(*w);
                }
                !w.durable()
            });
        }
        self.open_bytes = self.open.iter().map(|w| w.range.len).sum();
        done
    }

    /// Forgets every write; returns them (their pins go).
    pub fn take_all(&mut self) -> Vec<UnflushedWrite> {
        let mut all = std::mem::take(&mut self.open);
        for (_, e) in self.closed.drain(..) {
            all.extend(e);
        }
        self.open_bytes = 0;
        all
    }
}

// ---- the engine's side of durability: what the peer acknowledged but may
// lose, the activity-log pins of unflushed writes, the engine's own flushes.

impl Engine {
    /// The peer stopped receiving writes: what it acknowledged without a
    /// flush covering it may be lost in a power cut there, so it goes into
    /// the bitmap (durably, before any activity-log snapshot that could
    /// drop the extents: metadata is written in order).
    pub(super) fn peer_acks_lost(&mut self) {
        let (mut marked, done) = self.unflushed.peer_lost();
        for r in self.table.requests.values_mut() {
            if r.peer == Leg::Done && r.op.volatile_write() && !r.forwarded && !r.peer_marked {
                r.peer_marked = true;
                r.needs_local_flush = true;
                marked.push(r.range);
            }
        }
        if self.disk != DiskState::Diskless && !marked.is_empty() {
            for range in marked {
                let pages = self.bitmap.set_range(range.offset, range.len);
                self.next_meta.pages.extend(pages);
            }
            self.persist();
        }
        self.release_pins(done);
    }

    /// Writes durable on every copy: their activity-log extents may go.
    pub(super) fn release_pins(&mut self, writes: Vec<UnflushedWrite>) {
        if writes.is_empty() {
            return;
        }
        for w in writes {
            self.al.end(w.range.offset, w.range.len);
        }
        for waiting in std::mem::take(&mut self.al_waiting) {
            if self.table.requests.contains_key(&waiting) {
                self.start(waiting);
            }
        }
    }

    /// Issues a flush of the engine's own when finished writes wait and a
    /// bound says so: too many of them, writes waiting for an extent the
    /// unflushed ones pin, a mostly pinned activity log, their age (ticks),
    /// or a demotion.
    pub(super) fn flush_if_needed(&mut self) {
        if self.engine_flush.is_some() || !self.unflushed.has_open() {
            return;
        }
        let wanted = self.flush_wanted
            || self.unflushed.open_full()
            || !self.al_waiting.is_empty()
            || self.al.mostly_busy()
            || self.unflushed_ticks >= 2;
        if !wanted {
            return;
        }
        let id = self.internal_id();
        self.table
            .insert(id, Request::new(Op::Flush, Range::new(0, 0)));
        let has_disk = self.disk != DiskState::Diskless;
        let to_peer = self.replicating() && !self.forwarding();
        if let Some(r) = self.table.requests.get_mut(&id) {
            if has_disk {
                r.local = Leg::Pending;
            }
            if to_peer {
                r.peer = Leg::Pending;
            }
        }
        if has_disk {
            self.actions.push_back(Action::LocalIo {
                id,
                op: Op::Flush,
                range: Range::new(0, 0),
            });
        }
        if to_peer {
            self.send_to_peer(id, Op::Flush, Range::new(0, 0), false);
        }
        self.unflushed.close(id);
        self.engine_flush = Some(id);
        self.flush_wanted = false;
        self.unflushed_ticks = 0;
        if !has_disk && !to_peer {
            // Nothing to flush on (no disk, no peer): what is tracked
            // cannot become more durable than it is.
            self.try_complete(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(offset: u64, local: bool, peer: bool) -> UnflushedWrite {
        UnflushedWrite {
            range: Range::new(offset, 4096),
            local,
            peer,
        }
    }

    #[test]
    fn a_flush_covers_only_the_writes_finished_before_it_was_issued() {
        let mut u = Unflushed::default();
        u.add(w(0, true, true));
        u.close(7);
        u.add(w(4096, true, true));
        let done = u.flushed(7, true, true);
        assert_eq!(done, vec![w(0, false, false)]);
        assert_eq!(u.len(), 1, "the write after the flush waits for the next");
        assert!(u.has_open());
    }

    #[test]
    fn a_later_flush_covers_earlier_epochs_and_a_failed_leg_keeps_the_write() {
        let mut u = Unflushed::default();
        u.add(w(0, true, true));
        u.close(1);
        u.add(w(4096, true, false));
        u.close(2);
        // Flush 2 finished first: it was issued after epoch 1 closed too.
        let done = u.flushed(2, true, false);
        assert_eq!(done.len(), 1, "the local-only write is durable");
        assert_eq!(u.len(), 1, "the peer leg of the first write is not");
        assert!(
            u.flushed(1, true, true).is_empty(),
            "epoch 1 is gone already"
        );
        let (marked, done) = u.peer_lost();
        assert_eq!(marked, vec![Range::new(0, 4096)]);
        assert_eq!(done.len(), 1);
        assert!(u.is_empty());
    }
}
