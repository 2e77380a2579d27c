//! Roles in the volume task: promotion (waiting for a connected peer to
//! step down, asking the witness, letting an old primary's replica writes
//! land first), demotion (telling the witness), discarding the local copy,
//! and the clean detach.

use tokio::sync::oneshot;

use super::Shell;
use super::meta_writer::{MetaJob, MetaWrite};
use crate::engine::Role;
use crate::link::VolumeStateMsg;
use crate::volume::{Input, VolumeError};

/// Without a witness, how long `promote` waits for a connected peer to stop
/// being primary (a cluster manager demotes one node and promotes the other
/// right after; the demotion may still be on its way).
const PROMOTE_WAIT_WITHOUT_WITNESS_MS: u64 = 2000;

impl Shell {
    /// An operator's (or cluster manager's) promotion.
    pub(super) fn promote_requested(
        &mut self,
        force: bool,
        reply: oneshot::Sender<Result<(), VolumeError>>,
    ) {
        // How long a promotion waits for the peer to stop being
        // primary (its demotion may still be on the wire).
        let wait_ms = self
            .lease
            .as_ref()
            .map_or(PROMOTE_WAIT_WITHOUT_WITNESS_MS, |l| {
                2 * l.peer_settings.lease_ms
            });
        self.promote(force, crate::quorum::clock::now_ms() + wait_ms, reply)
    }

    /// The witness granted a promotion with `record`, asked at `sent_ms`.
    pub(super) fn promote_granted(
        &mut self,
        force: bool,
        record: &crate::quorum::Record,
        sent_ms: u64,
        reply: oneshot::Sender<Result<(), VolumeError>>,
    ) {
        let view = self.view_of(record);
        self.engine.witness_record(view);
        if let Some(l) = &self.lease {
            let ms = l.witness.lease_ms().unwrap_or(l.peer_settings.lease_ms);
            l.witness_granted(sent_ms, ms);
        }
        self.promote_now(force, reply);
    }

    /// Demotion: answered once it is durable (and, with a witness, once
    /// the witness recorded it or did not answer in time).
    pub(super) fn demote(&mut self, reply: oneshot::Sender<Result<(), VolumeError>>) {
        let was_primary = self.engine.status_role() == Role::Primary;
        match self.engine.demote() {
            Ok(token) if !was_primary => self.wait_meta(token, reply),
            Ok(token) => {
                (self.events)(&self.name, "demoted");
                let Some(l) = self.lease.clone() else {
                    return self.wait_meta(token, reply);
                };
                // The answer waits for the witness too (bounded by
                // its request timeout), so that a cluster manager's
                // promote on the other node finds the record free
                // instead of waiting out this node's lease. Best
                // effort: without an answer, the heartbeats tell
                // the witness (this node claims "not primary").
                let (meta_reply, meta_done) = oneshot::channel();
                self.wait_meta(token, meta_reply);
                let tx = self.tx.clone();
                let (volume, peer) = (self.name.clone(), self.peer_name.clone());
                let epoch = self.engine.record().epoch;
                tokio::spawn(async move {
                    match l
                        .witness
                        .change(&volume, &peer, epoch, crate::witness::WitnessOp::Demote)
                        .await
                    {
                        Ok(crate::witness::ChangeOutcome::Done(r)) => {
                            let _ = tx.send(Input::WitnessRecord(r));
                        }
                        other => tracing::warn!(
                            "volume {volume}: the witness did not record the demotion now ({other:?}); the next heartbeats tell it"
                        ),
                    }
                    let done = meta_done.await.unwrap_or(Err(VolumeError::Detached));
                    let _ = reply.send(done);
                });
            }
            Err(e) => {
                let _ = reply.send(Err(e.into()));
            }
        }
    }

    /// Split-brain resolution on this node: its changes are discarded and
    /// a full resync from the peer follows.
    pub(super) fn discard_local(&mut self, reply: oneshot::Sender<Result<(), VolumeError>>) {
        match self.engine.discard_local() {
            Ok(token) => {
                tracing::warn!(
                    "volume {}: local changes discarded; a full resync from {} follows",
                    self.name,
                    self.peer_name
                );
                self.wait_meta(Some(token), reply)
            }
            Err(e) => {
                let _ = reply.send(Err(e.into()));
            }
        }
    }

    /// A clean detach: demote, tell the peer, record the clean stop (the
    /// task ends once nothing is in flight).
    pub(super) fn detach(&mut self, reply: oneshot::Sender<Result<(), VolumeError>>) {
        if self.engine.status().role == Role::Primary {
            if let Err(e) = self.engine.demote() {
                let _ = reply.send(Err(e.into()));
                return;
            }
        }
        if let Some(conn) = &self.conn {
            let msg = VolumeStateMsg {
                volume: self.name.clone(),
                index: self.index,
                view: None,
                sync_done: None,
                dirty_runs: None,
            };
            let _ = self.ctl_tx.send((conn.clone(), msg));
        }
        self.engine.peer_disconnected();
        self.conn = None;
        // What that persists goes before the detach job.
        self.drain_actions();
        // A clean detach: the activity of this node is recorded
        // (the meta writer flushes the data disk first).
        let s = self.engine.status();
        let _ = self.meta_tx.send(MetaJob {
            write: MetaWrite::Detach,
            activity_log: None,
            disk: s.disk,
            generations: s.generations,
            primary: false,
            attached: false,
            pages: vec![],
            record: s.record,
            cache_lost: s.cache_lost,
            flush_data: true,
        });
        self.detach_write_done = None;
        self.detaching = Some(reply);
    }

    pub(super) fn promote(
        &mut self,
        force: bool,
        until_ms: u64,
        reply: oneshot::Sender<Result<(), VolumeError>>,
    ) {
        // Connected, but the peer has not said yet whether it is primary:
        // wait for that like for a peer that is still primary.
        // (A peer that detached the volume said so: it serves nothing and
        // demoted first, so it counts as gone.)
        let check = match self.engine.promote_check(force) {
            Ok(()) if self.peer_undecided() => Err(crate::engine::PromoteError::PeerPrimary),
            other => other,
        };
        match check {
            Err(crate::engine::PromoteError::PeerPrimary)
                if crate::quorum::clock::now_ms() < until_ms =>
            {
                // The cluster manager calls this when it believes the
                // primary is dead; the link may not have noticed yet. Wait
                // (bounded) for it to notice, then decide.
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    let _ = tx.send(Input::PromoteRetry {
                        force,
                        until_ms,
                        reply,
                    });
                });
                return;
            }
            Err(e) => {
                let _ = reply.send(Err(e.into()));
                return;
            }
            Ok(()) => {}
        }
        let Some(lease) = self.lease.clone() else {
            self.promote_now(force, reply);
            return;
        };
        if self.engine.status_role() == Role::Primary {
            let _ = reply.send(Ok(()));
            return;
        }
        let req = crate::volume::quorum::PromoteRequest {
            volume: self.name.clone(),
            peer: self.peer_name.clone(),
            epoch: self.engine.record().epoch,
            force,
            incomplete: self.engine.promotion_is_forced(),
            peer_connected: self.conn.is_some(),
            lease,
            tx: self.tx.clone(),
            reply,
        };
        tokio::spawn(req.run());
    }

    /// Connected, but the peer has not said yet whether it serves the
    /// volume (its first state message is on its way).
    pub(super) fn peer_undecided(&self) -> bool {
        self.conn.is_some() && !self.peer_detached && self.engine.peer_view().is_none()
    }

    pub(super) fn promote_now(
        &mut self,
        force: bool,
        reply: oneshot::Sender<Result<(), VolumeError>>,
    ) {
        // (Resync data may keep arriving under a forwarding primary: it
        // writes its own copy only in order with it, see the engine.)
        if self.engine.promote_waits_for_replicas() {
            // Replica writes of the old primary still in flight land first:
            // none may land after this node's own writes.
            self.promote_after_replicas = Some((force, reply));
            return;
        }
        let was_primary = self.engine.status_role() == Role::Primary;
        match self.engine.promote(force) {
            Ok(token) => {
                if !was_primary {
                    (self.events)(&self.name, "promoted");
                }
                self.wait_meta(token, reply)
            }
            Err(e) => {
                let _ = reply.send(Err(e.into()));
            }
        }
    }
}
