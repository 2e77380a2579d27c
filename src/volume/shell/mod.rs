//! The volume task: owns the engine and executes its actions. One file per
//! concern:
//!
//! | file | what |
//! |---|---|
//! | `attach` | opening the disk and metadata, recovery, starting the task |
//! | this file | the task loop and the dispatch of each input to its handler |
//! | `client` | client requests and the lease gate they pass (rule 7) |
//! | `execute` | carrying out the engine's actions (I/O, completions, notices) |
//! | `meta_writer` | metadata writes in order, and who waits for them |
//! | `link` | the peer connection and its state messages |
//! | `replica` | the replica side: what the peer sends or forwards |
//! | `roles` | promote, demote, discard, detach |
//! | `lease_gate` | the lease check per tick, the witness record |

mod attach;
mod client;
mod execute;
mod lease_gate;
mod link;
mod meta_writer;
mod replica;
mod roles;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::{Input, VolumeError, VolumeHandle, VolumeStatus, encode_read_path};
use crate::engine::{Engine, MetaToken, Role};
use crate::link::{PeerConnection, VolumeStateMsg};
use crate::resync::{Pacer, RateController};
use crate::store::{AlignedBuf, BlockStore};
pub use attach::{AttachOptions, EventHook, ExportHook, attach, open_meta};
use meta_writer::MetaJob;
pub(crate) use meta_writer::MetaWrite;

/// A sync target's count of its resync (reported as `TargetProgress`).
struct TargetSync {
    total_bytes: u64,
    /// The source's dirty chunks as last announced.
    announced_chunks: u64,
    received_bytes: u64,
    started: Instant,
}

struct Shell {
    engine: Engine,
    name: String,
    index: u32,
    peer_name: String,
    disk_path: PathBuf,
    data_bytes: u64,
    chunk_bytes: u64,
    store: Arc<dyn BlockStore>,
    tx: mpsc::UnboundedSender<Input>,
    meta_tx: mpsc::UnboundedSender<MetaJob>,
    ctl_tx: mpsc::UnboundedSender<(Arc<PeerConnection>, VolumeStateMsg)>,
    read_path: Arc<AtomicU8>,
    conn: Option<Arc<PeerConnection>>,
    readying: Option<Arc<PeerConnection>>,
    stash: Vec<Input>,
    next_id: u64,
    bufs: HashMap<u64, Arc<AlignedBuf>>,
    waiters: HashMap<u64, oneshot::Sender<Result<Option<AlignedBuf>, VolumeError>>>,
    read_results: HashMap<u64, AlignedBuf>,
    /// Replies waiting for a metadata write of the engine's.
    meta_waiters: Vec<(MetaToken, oneshot::Sender<Result<(), VolumeError>>)>,
    export: super::ExportHook,
    handle: VolumeHandle,
    exported: bool,
    peer_primary_seen: bool,
    resync_started: Option<Instant>,
    /// Set while this node is a sync target (see `TargetProgress`).
    target_sync: Option<TargetSync>,
    checksum_resync: bool,
    resync_pacer: Pacer,
    rate_controller: RateController,
    /// Start time and length of application writes in flight.
    write_started: HashMap<u64, (Instant, u64)>,
    detaching: Option<oneshot::Sender<Result<(), VolumeError>>>,
    /// Meaningful while `detaching`: whether the detach's final metadata
    /// write succeeded, once it is done (None: in flight).
    detach_write_done: Option<bool>,
    /// Meaningful while `conn` is set: the peer told us it detached this
    /// volume (its last state message had no view).
    peer_detached: bool,
    node: String,
    lease: Option<Arc<super::VolumeLease>>,
    held_for_lease: std::collections::VecDeque<Input>,
    metadata_writes: Arc<AtomicU64>,
    lease_lapsed: bool,
    events: super::EventHook,
    promote_after_replicas: Option<(bool, oneshot::Sender<Result<(), VolumeError>>)>,
    /// Writes forwarded by the peer, by engine id: where to reply.
    forwarded_replies: HashMap<u64, (Arc<PeerConnection>, u64)>,
}

impl Shell {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Input>) {
        while let Some(input) = rx.recv().await {
            self.handle_input(input);
            self.drain_actions();
            if let Some(l) = &self.lease {
                let peer_secondary = self.conn.is_some()
                    && self
                        .engine
                        .peer_view()
                        .is_some_and(|v| v.role == Role::Secondary);
                l.peer_counts.store(peer_secondary, Ordering::Release);
            }
            self.read_path
                .store(encode_read_path(self.engine.read_path()), Ordering::Release);
            self.note_peer_primary();
            if self.resync_started.is_some() {
                if let Some(rate) = self.rate_controller.tick(Instant::now()) {
                    self.resync_pacer.set_rate(rate);
                }
                let window = if self.rate_controller.app_active() {
                    crate::engine::RESYNC_WINDOW_BUSY
                } else {
                    crate::engine::RESYNC_WINDOW
                };
                if self.engine.set_resync_window(window) {
                    self.drain_actions();
                }
            }
            match (self.engine.resync_running(), self.resync_started.is_some()) {
                (true, false) => self.resync_started = Some(Instant::now()),
                (false, true) => self.resync_started = None,
                _ => {}
            }
            let announced = self.engine.peer_view().map_or(0, |v| v.dirty_chunks);
            match (self.engine.is_sync_target(), &mut self.target_sync) {
                (true, None) => {
                    self.target_sync = Some(TargetSync {
                        total_bytes: announced
                            .saturating_mul(self.chunk_bytes)
                            .min(self.data_bytes),
                        announced_chunks: announced,
                        received_bytes: 0,
                        started: Instant::now(),
                    });
                }
                (true, Some(t)) if t.announced_chunks != announced => {
                    // A newer announcement (the first one may predate the
                    // source's marking of what it copies): what arrived
                    // plus what it still has to copy.
                    t.announced_chunks = announced;
                    let left = announced.saturating_mul(self.chunk_bytes);
                    t.total_bytes = t
                        .total_bytes
                        .max(t.received_bytes.saturating_add(left))
                        .min(self.data_bytes);
                }
                (false, Some(_)) => self.target_sync = None,
                _ => {}
            }
            if self.detaching.is_some() && self.ready_to_stop() {
                break;
            }
        }
        // Requests the peer sent that are still queued get an answer:
        // dropped, the peer would wait 4 x peer_timeout for them and then
        // close the link of every volume. (Once closed, sends fail and the
        // daemon refuses them itself.)
        rx.close();
        while let Ok(input) = rx.try_recv() {
            if let Input::Replica(conn, req) = input {
                tokio::spawn(
                    async move { conn.reply(req.request, libc::EPERM as u32, None).await },
                );
            }
        }
        if let Some(reply) = self.detaching.take() {
            if self.detach_write_done == Some(false) {
                tracing::error!(
                    "volume {}: the final metadata write of the detach failed",
                    self.name
                );
                let _ = reply.send(Err(VolumeError::StoppedUnclean));
                return;
            }
            let _ = reply.send(Ok(()));
        }
        tracing::info!("volume {} detached", self.name);
    }

    /// Tells the export hook once when the peer became primary while this
    /// node exports nothing (it cleans up what a dead daemon left behind).
    fn note_peer_primary(&mut self) {
        let peer_primary = self.engine.peer_is_primary();
        if peer_primary && !self.peer_primary_seen && !self.exported {
            (self.export)(&self.handle, false);
        }
        self.peer_primary_seen = peer_primary;
    }

    fn ready_to_stop(&self) -> bool {
        self.waiters.is_empty()
            && self.engine.replicas_in_flight() == 0
            && self.meta_waiters.is_empty()
            && (self.detaching.is_none() || self.detach_write_done.is_some())
    }

    fn current_conn_id(&self) -> Option<u64> {
        self.conn.as_ref().map(|c| c.id)
    }

    /// One input, dispatched to its handler.
    fn handle_input(&mut self, input: Input) {
        match input {
            Input::Submit {
                op,
                range,
                buf,
                reply,
            } => self.submit(op, range, buf, reply),
            Input::LocalDone { id, ok } => self.engine.local_done(id, ok),
            Input::LocalRead { id, data } => self.local_read_done(id, data),
            Input::PeerDone { id, ok, data } => self.peer_done(id, ok, data),
            Input::DiskFailed => self.engine.disk_failed(),
            Input::MetaDone { write, ok } => self.meta_done(write, ok),
            Input::Connected(conn) => self.connected(conn),
            Input::Disconnected => self.disconnected(),
            Input::PeerState(conn_id, msg) => self.peer_state(conn_id, msg),
            Input::Replica(conn, req) => self.replica(conn, req),
            Input::ReplicaDone => self.replica_done(),
            Input::Promote { force, reply } => self.promote_requested(force, reply),
            Input::PromoteRetry {
                force,
                until_ms,
                reply,
            } => self.promote(force, until_ms, reply),
            Input::PromoteGranted {
                force,
                record,
                sent_ms,
                reply,
            } => self.promote_granted(force, &record, sent_ms, reply),
            Input::Demote { reply } => self.demote(reply),
            Input::WitnessRecord(record) => self.witness_record(&record),
            Input::WitnessChanged(record) => self.witness_changed(record.as_ref()),
            Input::Tick => self.tick(),
            Input::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Input::Verify { reply } => {
                let _ = reply.send(self.engine.start_verify().map_err(VolumeError::from));
            }
            Input::Resync { checksum, reply } => self.resync_requested(checksum, reply),
            Input::VerifyDone { id, equal } => self.engine.verify_done(id, equal),
            Input::DiscardLocal { reply } => self.discard_local(reply),
            Input::Detach { reply } => self.detach(reply),
        }
    }

    /// An operator's on-demand resync (with checksums: only differing
    /// chunks are copied).
    fn resync_requested(
        &mut self,
        checksum: bool,
        reply: oneshot::Sender<Result<bool, VolumeError>>,
    ) {
        self.checksum_resync = checksum;
        let _ = reply.send(self.engine.request_resync().map_err(VolumeError::from));
    }

    fn status(&self) -> VolumeStatus {
        VolumeStatus {
            engine: self.engine.status(),
            peer_name: self.peer_name.clone(),
            connected: self.conn.is_some(),
            rtt_us: self.conn.as_ref().map(|c| c.rtt().as_micros() as u64),
            data_bytes: self.data_bytes,
            disk_path: self.disk_path.clone(),
            chunk_bytes: self.chunk_bytes,
            resync_elapsed_s: self.resync_started.map(|t| t.elapsed().as_secs_f64()),
            lease_valid: self.lease.as_ref().map(|l| l.valid()),
            witness_reachable: self.lease.as_ref().map(|l| l.witness.reachable()),
            held_for_lease_requests: self.held_for_lease.len(),
            metadata_writes: self.metadata_writes.load(Ordering::Relaxed),
            target_progress: self.target_sync.as_ref().map(|t| super::TargetProgress {
                total_bytes: t.total_bytes,
                received_bytes: t.received_bytes,
                elapsed_s: t.started.elapsed().as_secs_f64(),
            }),
        }
    }
}
