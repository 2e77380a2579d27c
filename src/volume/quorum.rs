//! The volume's side of quorum: the leases that let a primary serve (rule 7),
//! the claim it sends with heartbeats, and promotion through the witness
//! (rule 3). The decisions stay in the engine and the witness arbiter; this
//! is the I/O around them.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::{Input, VolumeError};
use crate::engine::PromoteError;
use crate::link::PeerLease;
use crate::quorum::{LeaseSettings, NoQuorumPolicy, RecordView, clock};
use crate::witness::{ChangeOutcome, Refusal, WitnessClient, WitnessOp};

/// What a volume needs to take part in quorum.
#[derive(Clone)]
pub struct QuorumAttach {
    /// The session with the witness.
    pub witness: Arc<WitnessClient>,
    /// What to do without quorum.
    pub policy: NoQuorumPolicy,
    /// Lease bookkeeping with the peer node (from the link).
    pub peer_lease: Arc<PeerLease>,
    /// The peer lease's settings (the link's `lease_ms`).
    pub peer_lease_settings: LeaseSettings,
}

/// A volume's leases and the claim it reports to the witness; shared
/// between the volume task, the read path and the daemon's heartbeat loop.
pub struct VolumeLease {
    /// The primary lease from the witness runs until then (monotonic ms).
    pub witness_until_ms: AtomicU64,
    /// Lease bookkeeping with the peer node.
    pub peer: Arc<PeerLease>,
    /// Settings of the peer lease.
    pub peer_settings: LeaseSettings,
    /// What to do without a lease.
    pub policy: NoQuorumPolicy,
    /// The peer is connected for this volume and secondary: only then does
    /// its lease count (a peer that became primary grants nothing).
    pub peer_counts: std::sync::atomic::AtomicBool,
    /// The witness session.
    pub witness: Arc<WitnessClient>,
    claim: Mutex<(RecordView, bool)>,
}

impl VolumeLease {
    /// A lease state for a volume attaching with `q`.
    pub fn new(q: &QuorumAttach) -> Arc<Self> {
        Arc::new(VolumeLease {
            witness_until_ms: AtomicU64::new(0),
            peer: q.peer_lease.clone(),
            peer_settings: q.peer_lease_settings,
            policy: q.policy,
            peer_counts: std::sync::atomic::AtomicBool::new(false),
            witness: q.witness.clone(),
            claim: Mutex::new((RecordView::default(), false)),
        })
    }

    /// Whether a fresh lease (witness or peer) lets a primary serve now.
    pub fn valid(&self) -> bool {
        let now = clock::now_ms();
        self.witness_until_ms.load(Ordering::Acquire) > now
            || (self.peer_counts.load(Ordering::Acquire)
                && self.peer.held_until_ms.load(Ordering::Acquire) > now)
    }

    /// Extends the witness lease (a grant for a request sent at `sent_ms`).
    pub fn witness_granted(&self, sent_ms: u64, lease_ms: u64) {
        self.witness_until_ms
            .fetch_max(sent_ms.saturating_add(lease_ms), Ordering::AcqRel);
    }

    /// The claim for the next heartbeat.
    pub fn claim(&self) -> (RecordView, bool) {
        self.claim.lock().map(|c| *c).unwrap_or_default()
    }

    /// Records the current claim (from the volume task).
    pub fn set_claim(&self, claim: (RecordView, bool)) {
        if let Ok(mut c) = self.claim.lock()
            && *c != claim
        {
            *c = claim;
        }
    }

    /// When any lease the peer could hold from this node has run out:
    /// counted from this node's last grant (or from process start).
    pub fn peer_lease_bound_ms(&self) -> u64 {
        self.peer_settings
            .grantor_bound_ms(self.peer.granted_ms.load(Ordering::Acquire))
    }
}

/// Promotion through the witness (rule 3): waits out any lease the old
/// primary could hold from this node, then asks the witness (which waits
/// out its own lease), and hands the grant back to the volume task.
pub(super) struct PromoteRequest {
    pub volume: String,
    pub peer: String,
    pub epoch: u64,
    pub force: bool,
    /// The promotion starts a forced history (`Engine::promotion_is_forced`).
    pub incomplete: bool,
    pub peer_connected: bool,
    pub lease: Arc<VolumeLease>,
    pub tx: mpsc::UnboundedSender<Input>,
    pub reply: oneshot::Sender<Result<(), VolumeError>>,
}

impl PromoteRequest {
    pub(super) async fn run(self) {
        let PromoteRequest {
            volume,
            peer,
            mut epoch,
            force,
            incomplete,
            peer_connected,
            lease,
            tx,
            reply,
        } = self;
        let fail = |e: PromoteError| Err(VolumeError::Promote(e));
        let lease_ms = lease.peer_settings.lease_ms.max(1);
        // Give up when the old primary is evidently alive (its lease keeps
        // being renewed): one full lease plus margins.
        let deadline = clock::now_ms() + lease.peer_settings.grantor_bound_ms(0) + 1000;
        if !peer_connected {
            let bound = lease.peer_lease_bound_ms();
            let now = clock::now_ms();
            if bound > now {
                tracing::info!(
                    "volume {volume}: waiting {} ms for any lease {peer} holds from this node to run out",
                    bound - now
                );
                tokio::time::sleep(Duration::from_millis(bound - now)).await;
            }
        }
        for _ in 0..64 {
            let sent = clock::now_ms();
            let outcome = lease
                .witness
                .change(
                    &volume,
                    &peer,
                    epoch,
                    WitnessOp::Promote { force, incomplete },
                )
                .await;
            let result = match outcome {
                Ok(ChangeOutcome::Done(record)) => {
                    let _ = tx.send(Input::PromoteGranted {
                        force,
                        record,
                        sent_ms: sent,
                        reply,
                    });
                    return;
                }
                Ok(ChangeOutcome::Conflict(record)) => {
                    epoch = record.epoch;
                    let _ = tx.send(Input::WitnessRecord(record));
                    continue;
                }
                Ok(ChangeOutcome::Wait { wait_ms, holder }) => {
                    let now = clock::now_ms();
                    if now + wait_ms > deadline {
                        fail(PromoteError::PeerLease(format!(
                            "the witness says {holder} still holds the primary lease (it keeps renewing it for {lease_ms} ms at a time); demote it first"
                        )))
                    } else {
                        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
                        continue;
                    }
                }
                Ok(ChangeOutcome::Refused(Refusal::Outdated)) => fail(PromoteError::Outdated),
                Ok(ChangeOutcome::Refused(Refusal::Forced)) => fail(PromoteError::ForcedRecord),
                Ok(ChangeOutcome::Refused(r)) => fail(PromoteError::NoQuorum(r.to_string())),
                Err(e) => fail(PromoteError::NoQuorum(format!(
                    "the witness must consent to a promotion and it cannot be asked: {e}"
                ))),
            };
            let _ = reply.send(result);
            return;
        }
        let _ = reply.send(fail(PromoteError::NoQuorum(
            "the witness record keeps changing; try again".into(),
        )));
    }
}

/// Carries out one witness change the engine asked for and reports back.
pub(super) async fn change(
    lease: Arc<VolumeLease>,
    volume: String,
    peer: String,
    expected_epoch: u64,
    op: WitnessOp,
    tx: mpsc::UnboundedSender<Input>,
) {
    let sent = clock::now_ms();
    let outcome = lease
        .witness
        .change(&volume, &peer, expected_epoch, op)
        .await;
    let record = match outcome {
        Ok(ChangeOutcome::Done(r)) => {
            if r.primary.is_some() && op == WitnessOp::Outdate {
                // Outdating as primary also (re)grants the witness lease.
                if let Some(ms) = lease.witness.lease_ms() {
                    lease.witness_granted(sent, ms);
                }
            }
            Some(r)
        }
        Ok(ChangeOutcome::Conflict(r)) => Some(r),
        Ok(other) => {
            tracing::warn!("volume {volume}: witness refused {op:?}: {other:?}");
            None
        }
        Err(e) => {
            tracing::warn!("volume {volume}: witness {op:?} failed: {e}");
            None
        }
    };
    let _ = tx.send(Input::WitnessChanged(record));
}
