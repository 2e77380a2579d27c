//! The volume task: owns the engine and executes its actions.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Instant;

use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{HandleInner, Input, VolumeError, VolumeHandle, VolumeStatus, encode_read_path};
use crate::config::MetaLocation;
use crate::engine::{Action, Engine, EngineConfig, MetaToken, Notice, Op, Range, Role};
use crate::link::wire::{FLAG_FORWARD, FLAG_FUA, FLAG_RESYNC, Kind};
use crate::link::{InboundRequest, PeerConnection, VolumeStateMsg, bytes_of, data_header};
use crate::meta::{Bitmap, DiskState, MetaDevice, MetaError, MetaLayout, Superblock};
use crate::resync::{Pacer, RateController};
use crate::store::uring::Uring;
use crate::store::{AlignedBuf, BlockStore, FaultPlan, FaultyStore, UringStore, backing};

/// Which metadata write a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MetaWrite {
    /// One of the engine's, in its sequence.
    Engine(MetaToken),
    /// The final write of a clean detach (after every engine write).
    Detach,
}

/// Most dirty-chunk runs sent with a state message (fits the 64 KiB control
/// payload); beyond that the peer falls back to a full resync.
const DIRTY_RUNS_MAX: usize = 2000;
/// Without a witness, how long `promote` waits for a connected peer to stop
/// being primary (a cluster manager demotes one node and promotes the other
/// right after; the demotion may still be on its way).
const PROMOTE_WAIT_WITHOUT_WITNESS_MS: u64 = 2000;

/// Called when the volume starts (true) or stops (false) being exported.
pub type ExportHook = Arc<dyn Fn(&VolumeHandle, bool) + Send + Sync>;

/// Called with (volume, event name) for the configured event handlers.
pub type EventHook = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// Everything `attach` needs.
pub struct AttachOptions {
    /// Volume name.
    pub name: String,
    /// Index announced to the peer (unique per node).
    pub index: u32,
    /// Backing disk.
    pub disk: PathBuf,
    /// Metadata location.
    pub meta: MetaLocation,
    /// This node's name.
    pub node: String,
    /// The peer's name.
    pub peer: String,
    /// Resync rate limits and the application latency target.
    pub resync_rate: crate::resync::RateSettings,
    /// Activity-log extents (4 MiB each) kept hot.
    pub al_extents: usize,
    /// The disk may lose completed writes in a power cut until a flush
    /// covers them (see `config::DiskCache`).
    pub volatile_cache: bool,
    /// The running kernel's boot id (None: unknown; an unclean stop then
    /// counts as a power cut).
    pub boot_id: Option<[u8; 16]>,
    /// Shared io_uring.
    pub ring: Uring,
    /// Fault injection plan (None: no fault layer).
    pub faults: Option<Arc<FaultPlan>>,
    /// Export hook.
    pub export: ExportHook,
    /// Event hook (quorum-lost, promoted, ...).
    pub events: EventHook,
    /// With a witness: the quorum session (None: two-node mode).
    pub quorum: Option<super::QuorumAttach>,
}

/// Opens the metadata area of a volume and computes its layout.
pub fn open_meta(
    disk: &Path,
    meta: &MetaLocation,
    chunk_bytes: u32,
) -> Result<(MetaDevice, PathBuf), MetaError> {
    let io = |path: &Path| {
        let p = path.display().to_string();
        move |source| MetaError::Io {
            path: p.clone(),
            source,
        }
    };
    let file = backing::open_direct(disk, false).map_err(io(disk))?;
    let device_bytes = backing::size_bytes(&file).map_err(io(disk))?;
    match meta {
        MetaLocation::Internal => {
            let layout = MetaLayout::internal(device_bytes, chunk_bytes)?;
            Ok((MetaDevice::open(disk, layout)?, disk.to_path_buf()))
        }
        MetaLocation::External(path) => {
            let layout = MetaLayout::external(device_bytes, chunk_bytes)?;
            let needed = layout.meta_bytes();
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(io(path))?;
            let have = backing::size_bytes(&f).map_err(io(path))?;
            if have < needed && !backing::is_block_device(&f).map_err(io(path))? {
                f.set_len(needed).map_err(io(path))?;
            }
            Ok((MetaDevice::open(path, layout)?, path.clone()))
        }
    }
}

/// Attaches a volume: reads and checks its metadata and opens the store on
/// a blocking thread (a slow or hung disk must not stall the daemon's
/// runtime thread, which carries every other volume, the link keepalives
/// and the lease renewals), then starts the volume task.
pub async fn attach(opts: AttachOptions) -> Result<VolumeHandle, VolumeError> {
    let opened = tokio::task::spawn_blocking(move || open_volume(opts))
        .await
        .map_err(|e| VolumeError::Other(format!("the attach thread failed: {e}")))??;
    Ok(start(opened))
}

/// A volume whose metadata has been read, checked and marked attached, and
/// whose store is open: everything `start` needs, with no I/O left to do.
struct OpenedVolume {
    opts: AttachOptions,
    engine: Engine,
    meta: MetaDevice,
    sb: Superblock,
    store: Arc<dyn BlockStore>,
    data_bytes: u64,
}

/// The blocking half of `attach`: opens, probes and reads the metadata,
/// recovers after an unclean stop, and writes the superblock's attached
/// mark (O_DSYNC).
fn open_volume(opts: AttachOptions) -> Result<OpenedVolume, VolumeError> {
    // The chunk size is whatever create-md recorded; read the superblock with
    // the default layout first only to learn it.
    let (probe, _) = open_meta(&opts.disk, &opts.meta, crate::meta::DEFAULT_CHUNK_BYTES)?;
    let (first, _) = probe.read_superblock().or_else(|e| {
        // The layout depends on the chunk size: retry every legal size.
        let mut chunk = 4096u32;
        while chunk <= 1 << 20 {
            if let Ok((m, _)) = open_meta(&opts.disk, &opts.meta, chunk)
                && let Ok(found) = m.read_superblock()
            {
                return Ok(found);
            }
            chunk *= 2;
        }
        Err(e)
    })?;
    let (meta, _) = open_meta(&opts.disk, &opts.meta, first.chunk_bytes)?;
    let (mut sb, health) = meta.read_superblock()?;
    if let crate::meta::superblock::SlotHealth::OneDamaged(why) = &health {
        tracing::warn!(
            "volume {}: one superblock copy is damaged ({why}); using the other",
            opts.name
        );
    }
    if sb.volume_name != opts.name {
        return Err(MetaError::WrongVolume {
            found: sb.volume_name,
            expected: opts.name,
        }
        .into());
    }
    let layout = *meta.layout();
    if sb.data_bytes != layout.data_bytes {
        return Err(MetaError::SizeChanged {
            recorded: sb.data_bytes,
            now: layout.data_bytes,
        }
        .into());
    }
    let mut bitmap = Bitmap::new(layout.data_bytes, u64::from(sb.chunk_bytes));
    let damaged = meta.read_bitmap(&mut bitmap)?;
    if !damaged.is_empty() {
        tracing::warn!(
            "volume {}: {} bitmap page(s) failed their checksum (first: page {}); every chunk they cover counts as out of sync",
            opts.name,
            damaged.len(),
            damaged[0]
        );
        for &page in &damaged {
            meta.write_bitmap_page(&bitmap, page)?;
        }
    }
    let crashed_primary = sb.attached && sb.primary;
    let uring = UringStore::open(&opts.disk, layout.data_bytes, opts.ring.clone())?;
    let store: Arc<dyn BlockStore> = match &opts.faults {
        Some(plan) => Arc::new(FaultyStore::new(uring, plan.clone())),
        None => Arc::new(uring),
    };
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ (u64::from(std::process::id()) << 32);
    let cfg = EngineConfig {
        data_bytes: layout.data_bytes,
        chunk_bytes: u64::from(sb.chunk_bytes),
        tie_winner: opts.node < opts.peer,
        al_extent_bytes: crate::meta::activity_log::DEFAULT_AL_EXTENT_BYTES,
        al_extents: opts.al_extents,
        quorum: opts.quorum.as_ref().map(|q| q.policy),
        volatile_cache: opts.volatile_cache,
    };
    let disk_state = if sb.disk_state == DiskState::Diskless {
        DiskState::Inconsistent
    } else {
        sb.disk_state
    };
    let mut engine = Engine::new(cfg, disk_state, sb.generations, bitmap, seed);
    engine.set_record(sb.record);
    engine.set_cache_lost(sb.cache_lost);
    // (Before the recovery: every metadata write the engine asks for from
    // here on must carry the "lost power" mark.)
    let boot_id = opts.boot_id.unwrap_or([0; 16]);
    if sb.attached {
        note_unclean_stop(&sb, boot_id, &opts.disk, &opts.name, &mut engine)?;
    }
    resume_activity_log(&meta, &mut engine, crashed_primary, &opts.name);
    // (The "lost power" mark is durable before the new boot id is: a
    // crash right after this write must not make the next attach think
    // only the process died.)
    sb.cache_lost = engine.status().cache_lost;
    sb.attached = true;
    sb.boot_id = boot_id;
    // A crashed primary stays marked primary until the recovery's bitmap
    // marks are on disk (the engine's first metadata write records both):
    // a crash before that recovers again at the next attach.
    sb.primary = crashed_primary;
    sb.seq += 1;
    meta.write_superblock(&sb)?;
    Ok(OpenedVolume {
        opts,
        engine,
        meta,
        sb,
        store,
        data_bytes: layout.data_bytes,
    })
}

/// The non-blocking half of `attach`: spawns the volume's tasks.
fn start(opened: OpenedVolume) -> VolumeHandle {
    let OpenedVolume {
        opts,
        engine,
        meta,
        sb,
        store,
        data_bytes,
    } = opened;
    let (tx, rx) = mpsc::unbounded_channel();
    let lease = opts.quorum.as_ref().map(super::VolumeLease::new);
    // Witness retries and lease checks, and the age bound of writes
    // waiting for a flush.
    tokio::spawn(ticker(tx.clone()));
    let read_path = Arc::new(AtomicU8::new(encode_read_path(engine.read_path())));
    let handle = VolumeHandle {
        inner: Arc::new(HandleInner {
            name: opts.name.clone(),
            tx: tx.clone(),
            read_path: read_path.clone(),
            store: store.clone(),
            permits: Semaphore::new(super::CLIENT_INFLIGHT_MAX),
            client_bytes: Arc::new(Semaphore::new(super::CLIENT_INFLIGHT_BYTES_MAX)),
            data_bytes,
            lease: lease.clone(),
        }),
    };
    let chunk_bytes = u64::from(sb.chunk_bytes);
    let (meta_tx, meta_rx) = mpsc::unbounded_channel();
    let metadata_writes = Arc::new(AtomicU64::new(0));
    tokio::spawn(meta_writer(
        meta,
        store.clone(),
        sb,
        meta_rx,
        tx.clone(),
        metadata_writes.clone(),
    ));
    let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
    tokio::spawn(control_sender(ctl_rx));
    let shell = Shell {
        engine,
        name: opts.name,
        index: opts.index,
        peer_name: opts.peer,
        disk_path: opts.disk,
        data_bytes,
        chunk_bytes,
        store,
        tx,
        meta_tx,
        ctl_tx,
        read_path,
        conn: None,
        readying: None,
        stash: Vec::new(),
        replica_inflight: 0,
        next_id: 1,
        bufs: HashMap::new(),
        waiters: HashMap::new(),
        read_results: HashMap::new(),
        meta_waiters: Vec::new(),
        export: opts.export,
        handle: handle.clone(),
        exported: false,
        peer_primary_seen: false,
        resync_started: None,
        target_sync: None,
        checksum_resync: false,
        resync_pacer: Pacer::new(opts.resync_rate.max_bytes_per_s),
        rate_controller: RateController::new(opts.resync_rate),
        write_started: HashMap::new(),
        detaching: None,
        detach_write_done: None,
        peer_detached: false,
        node: opts.node,
        lease,
        held_for_lease: std::collections::VecDeque::new(),
        metadata_writes,
        lease_lapsed: false,
        events: opts.events,
        promote_after_replicas: None,
        forwarded_replies: HashMap::new(),
    };
    tokio::spawn(shell.run(rx));
    handle
}

/// The volume was attached when its node stopped. If the machine has not
/// rebooted since (same boot id), only the process died: the disk's cache
/// still holds every completed write, and a flush makes them durable now.
/// Otherwise the node went down with the machine, maybe by a power cut,
/// and completed writes that no flush covered may be gone: the engine is
/// told (`power_lost`), which keeps this copy from promoting until it
/// synced with its peer.
fn note_unclean_stop(
    sb: &Superblock,
    boot_id: [u8; 16],
    disk: &Path,
    name: &str,
    engine: &mut Engine,
) -> Result<(), VolumeError> {
    if sb.boot_id == boot_id && boot_id != [0; 16] {
        crate::store::backing::sync_data(disk).map_err(|source| MetaError::Io {
            path: disk.display().to_string(),
            source,
        })?;
        tracing::info!(
            "volume {name}: the daemon stopped uncleanly; the disk's cache survived (same boot) and is flushed now"
        );
        return Ok(());
    }
    engine.power_lost();
    if engine.status().cache_lost {
        tracing::warn!(
            "volume {name}: the machine went down with the volume attached (maybe a power cut): this copy may have lost completed writes no flush covered; it syncs from its peer before it may be promoted"
        );
    }
    Ok(())
}

struct MetaJob {
    write: MetaWrite,
    activity_log: Option<crate::meta::activity_log::AlSnapshot>,
    disk: DiskState,
    generations: crate::meta::Generations,
    primary: bool,
    attached: bool,
    pages: Vec<(u32, Box<[u8; crate::meta::bitmap::BITMAP_PAGE_BYTES]>)>,
    record: crate::quorum::RecordView,
    cache_lost: bool,
    /// Flush the data disk before this write: a new generation starts
    /// (see `Engine::start_tracking`), or the volume detaches cleanly.
    flush_data: bool,
}

/// Ticks the volume every 50 ms: witness retries, lease checks, flushes.
async fn ticker(tx: mpsc::UnboundedSender<Input>) {
    let mut every = tokio::time::interval(std::time::Duration::from_millis(50));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        every.tick().await;
        if tx.send(Input::Tick).is_err() {
            return;
        }
    }
}

/// Writes metadata jobs strictly in order.
async fn meta_writer(
    meta: MetaDevice,
    store: Arc<dyn BlockStore>,
    mut sb: Superblock,
    mut rx: mpsc::UnboundedReceiver<MetaJob>,
    done: mpsc::UnboundedSender<Input>,
    writes: Arc<AtomicU64>,
) {
    let meta = Arc::new(meta);
    let mut failed = false;
    while let Some(first) = rx.recv().await {
        // Group commit: every job already queued behind this one is folded
        // into a single write (under scattered writes at depth 32, one
        // activity-log update instead of up to 32 in a row). The detach
        // job keeps its own write, after the others.
        let mut job = first;
        let mut detach = None;
        while job.write != MetaWrite::Detach {
            match rx.try_recv() {
                Ok(next) if next.write == MetaWrite::Detach => {
                    detach = Some(next);
                    break;
                }
                Ok(next) => job = job.then(next),
                Err(_) => break,
            }
        }
        for mut job in std::iter::once(job).chain(detach) {
            let write = job.write;
            if job.flush_data && !failed && store.flush().await.is_err() {
                // Neither a new generation nor the clean-stop mark without
                // every completed write durable first.
                tracing::error!("the data disk failed to flush before a metadata write");
                failed = true;
                if !job.attached {
                    job.attached = true;
                }
            }
            let ok = !failed && write_meta_job(&meta, &mut sb, job).await;
            failed |= !ok;
            if ok {
                writes.fetch_add(1, Ordering::Relaxed);
            }
            let _ = done.send(Input::MetaDone { write, ok });
        }
    }
}

impl MetaJob {
    /// This job followed by `next`: the newer state, the newer activity-log
    /// snapshot (it holds every extent with writes in flight), every bitmap
    /// page (the newer copy of a page wins), and the newer token (never
    /// the detach's: it is never folded).
    fn then(mut self, next: MetaJob) -> MetaJob {
        let mut pages = std::mem::take(&mut self.pages);
        pages.retain(|(p, _)| !next.pages.iter().any(|(q, _)| q == p));
        pages.extend(next.pages);
        MetaJob {
            write: next.write,
            activity_log: next.activity_log.or(self.activity_log),
            disk: next.disk,
            generations: next.generations,
            primary: next.primary,
            attached: next.attached,
            pages,
            record: next.record,
            cache_lost: next.cache_lost,
            flush_data: self.flush_data || next.flush_data,
        }
    }
}

/// Writes one job's bitmap pages, activity log and superblock; false (and
/// logged) when the metadata device failed.
async fn write_meta_job(meta: &Arc<MetaDevice>, sb: &mut Superblock, job: MetaJob) -> bool {
    sb.seq += 1;
    sb.disk_state = job.disk;
    sb.generations = job.generations;
    sb.primary = job.primary;
    sb.attached = job.attached;
    sb.record = job.record;
    sb.cache_lost = job.cache_lost;
    let m = meta.clone();
    let s = sb.clone();
    let pages = job.pages;
    let al = job.activity_log;
    let res = tokio::task::spawn_blocking(move || -> Result<(), MetaError> {
        for (page, bytes) in &pages {
            m.write_page_bytes(*page, &bytes[..])?;
        }
        if let Some(al) = &al {
            m.write_activity_log(al)?;
        }
        m.write_superblock(&s)
    })
    .await;
    let ok = matches!(res, Ok(Ok(())));
    if !ok {
        tracing::error!("metadata write failed: {:?}", res.map(|r| r.err()));
    }
    ok
}

/// Sends control messages to the peer in order.
async fn control_sender(mut rx: mpsc::UnboundedReceiver<(Arc<PeerConnection>, VolumeStateMsg)>) {
    while let Some((conn, msg)) = rx.recv().await {
        let _ = conn.send_volume_state(&msg).await;
    }
}

/// Reads the activity log when attaching (before anything writes it).
/// After a crash of this node as primary, every extent of the log is marked
/// out of sync (rule 6). Either way the log's numbering continues after the
/// newest snapshot on disk, so that no snapshot of an earlier attach can
/// outrank the ones this attach writes (issue 13, hole 2a).
fn resume_activity_log(meta: &MetaDevice, engine: &mut Engine, crashed_primary: bool, name: &str) {
    match meta.read_activity_log() {
        Ok(Some(al)) if crashed_primary => {
            tracing::warn!(
                "volume {name}: this node crashed while primary; marking the {} extents of its activity log out of sync",
                al.extents.len()
            );
            engine.recover_activity_log(&al.extents, u64::from(al.extent_bytes), al.seq);
        }
        Ok(Some(al)) => engine.continue_activity_log(al.seq),
        Ok(None) => {}
        Err(e) if crashed_primary => {
            tracing::warn!(
                "volume {name}: this node crashed while primary and its activity log is unreadable ({e}); marking the whole volume out of sync"
            );
            engine.mark_all_out_of_sync();
        }
        Err(e) => tracing::warn!(
            "volume {name}: the activity log is unreadable ({e}); it is written afresh"
        ),
    }
}

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
    replica_inflight: usize,
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
            && self.replica_inflight == 0
            && self.meta_waiters.is_empty()
            && (self.detaching.is_none() || self.detach_write_done.is_some())
    }

    fn current_conn_id(&self) -> Option<u64> {
        self.conn.as_ref().map(|c| c.id)
    }

    fn handle_input(&mut self, input: Input) {
        match input {
            Input::Submit {
                op,
                range,
                buf,
                reply,
            } => {
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
            Input::LocalDone { id, ok } => self.engine.local_done(id, ok),
            Input::LocalRead { id, data } => {
                let ok = data.is_some();
                if let Some(d) = data {
                    self.read_results.insert(id, d);
                }
                self.engine.local_done(id, ok);
            }
            Input::PeerDone { id, ok, data } => {
                if let Some(d) = data {
                    self.read_results.insert(id, d);
                }
                self.engine.peer_done(id, ok);
            }
            Input::DiskFailed => self.engine.disk_failed(),
            Input::MetaDone { write, ok } => {
                let MetaWrite::Engine(token) = write else {
                    self.detach_write_done = Some(ok);
                    return;
                };
                if ok {
                    self.engine.meta_persisted(token);
                } else {
                    self.engine.meta_failed();
                }
                let persisted = ok;
                let mut keep = Vec::new();
                for (t, reply) in self.meta_waiters.drain(..) {
                    if t <= token {
                        let _ = reply.send(if persisted {
                            Ok(())
                        } else {
                            Err(VolumeError::Other("metadata write failed".into()))
                        });
                    } else {
                        keep.push((t, reply));
                    }
                }
                self.meta_waiters = keep;
            }
            Input::Connected(conn) => {
                self.engine.peer_disconnected();
                self.conn = None;
                self.stash.clear();
                if self.replica_inflight == 0 {
                    self.connection_ready(conn);
                } else {
                    // Let the old connection's replica writes land first.
                    self.readying = Some(conn);
                }
            }
            Input::Disconnected => {
                self.conn = None;
                self.readying = None;
                self.stash.clear();
                self.engine.peer_disconnected();
            }
            Input::PeerState(conn_id, msg) => {
                if self.readying.as_ref().is_some_and(|c| c.id == conn_id) {
                    self.stash.push(Input::PeerState(conn_id, msg));
                    return;
                }
                if self.current_conn_id() != Some(conn_id) {
                    return;
                }
                self.peer_detached = msg.view.is_none();
                match msg.view {
                    None => self.engine.peer_disconnected(),
                    Some(view) => {
                        self.engine.peer_dirty_runs(msg.dirty_runs);
                        self.engine.peer_state(view);
                        if let Some(g) = msg.sync_done {
                            self.engine.peer_sync_done(g);
                        }
                    }
                }
            }
            Input::Replica(conn, req) => self.replica(conn, req),
            Input::ReplicaDone => {
                self.replica_inflight -= 1;
                if self.replica_inflight == 0
                    && let Some((force, reply)) = self.promote_after_replicas.take()
                {
                    self.promote_now(force, reply);
                }
                if self.replica_inflight == 0
                    && let Some(conn) = self.readying.take()
                {
                    self.connection_ready(conn);
                }
            }
            Input::Promote { force, reply } => {
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
            } => {
                let view = self.view_of(&record);
                self.engine.witness_record(view);
                if let Some(l) = &self.lease {
                    let ms = l.witness.lease_ms().unwrap_or(l.peer_settings.lease_ms);
                    l.witness_granted(sent_ms, ms);
                }
                self.promote_now(force, reply);
            }
            Input::Demote { reply } => {
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
            Input::WitnessRecord(record) => {
                let view = self.view_of(&record);
                self.engine.witness_record(view);
            }
            Input::WitnessChanged(record) => {
                let view = record.map(|r| self.view_of(&r));
                self.engine.witness_change_done(view);
            }
            Input::Tick => self.tick(),
            Input::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Input::Verify { reply } => {
                let _ = reply.send(self.engine.start_verify().map_err(VolumeError::from));
            }
            Input::Resync { checksum, reply } => {
                self.checksum_resync = checksum;
                let _ = reply.send(self.engine.request_resync().map_err(VolumeError::from));
            }
            Input::VerifyDone { id, equal } => self.engine.verify_done(id, equal),
            Input::DiscardLocal { reply } => match self.engine.discard_local() {
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
            },
            Input::Detach { reply } => {
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
        }
    }

    fn view_of(&self, record: &crate::quorum::Record) -> crate::quorum::RecordView {
        crate::quorum::RecordView::of(record, &self.node, &self.peer_name)
    }

    fn promote(
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
        let req = super::quorum::PromoteRequest {
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
    fn peer_undecided(&self) -> bool {
        self.conn.is_some() && !self.peer_detached && self.engine.peer_view().is_none()
    }

    fn promote_now(&mut self, force: bool, reply: oneshot::Sender<Result<(), VolumeError>>) {
        // (Resync data may keep arriving under a forwarding primary: it
        // writes its own copy only in order with it, see the engine.)
        if self.replica_inflight > 0 && !self.engine.promotes_by_forwarding() {
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

    /// Periodic (with a witness): retries, and the lease check of rule 7.
    fn tick(&mut self) {
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

    /// Answers `reply` once the engine's metadata write `token` is durable
    /// (None: at once).
    fn wait_meta(
        &mut self,
        token: Option<MetaToken>,
        reply: oneshot::Sender<Result<(), VolumeError>>,
    ) {
        match token {
            Some(t) if !self.engine.meta_durable(token) => self.meta_waiters.push((t, reply)),
            // Nothing new to persist (e.g. demoting a secondary).
            _ => {
                let _ = reply.send(Ok(()));
            }
        }
    }

    fn connection_ready(&mut self, conn: Arc<PeerConnection>) {
        self.conn = Some(conn.clone());
        self.peer_detached = false;
        self.announce(None);
        for input in std::mem::take(&mut self.stash) {
            self.handle_input(input);
        }
    }

    fn announce(&mut self, sync_done: Option<crate::meta::Generations>) {
        if let Some(conn) = &self.conn {
            let msg = VolumeStateMsg {
                volume: self.name.clone(),
                index: self.index,
                view: Some(self.engine.announced_view()),
                sync_done,
                dirty_runs: self.engine.dirty_runs(DIRTY_RUNS_MAX),
            };
            let _ = self.ctl_tx.send((conn.clone(), msg));
        }
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

    fn drain_actions(&mut self) {
        while let Some(a) = self.engine.poll_action() {
            self.execute(a);
        }
    }

    fn execute(&mut self, a: Action) {
        match a {
            Action::LocalIo { id, op, range } => self.local_io(id, op, range),
            Action::PeerIo {
                id,
                op,
                range,
                forward,
            } => self.peer_io(id, op, range, forward),
            Action::ResyncChunk { id, range } => self.resync_chunk(id, range),
            Action::VerifyChunk { id, range } => self.verify_chunk(id, range),
            Action::Complete { id, result } => {
                self.bufs.remove(&id);
                // Application writes, ours or forwarded by a primary whose
                // copy we resync, steer the resync rate (see RateController).
                if let Some((t, bytes)) = self.write_started.remove(&id) {
                    self.rate_controller.app_write_done(
                        t.elapsed(),
                        bytes,
                        self.resync_started.is_some(),
                    );
                }
                if let Some((conn, request)) = self.forwarded_replies.remove(&id) {
                    return self.reply_forwarded(conn, request, result.is_ok());
                }
                if let Err(e) = &result {
                    tracing::debug!("volume {}: request {id} failed: {e}", self.name);
                }
                let data = self.read_results.remove(&id);
                if let Some(w) = self.waiters.remove(&id) {
                    let _ = w.send(result.map(|_| data).map_err(VolumeError::from));
                }
            }
            Action::PersistMeta {
                token,
                disk,
                generations,
                primary,
                pages,
                activity_log,
                record,
                cache_lost,
                flush_data,
            } => {
                let _ = self.meta_tx.send(MetaJob {
                    write: MetaWrite::Engine(token),
                    activity_log,
                    disk,
                    generations,
                    primary,
                    attached: true,
                    pages,
                    record,
                    cache_lost,
                    flush_data,
                });
            }
            Action::WitnessChange { op, expected_epoch } => match self.lease.clone() {
                Some(l) => {
                    tokio::spawn(super::quorum::change(
                        l,
                        self.name.clone(),
                        self.peer_name.clone(),
                        expected_epoch,
                        op,
                        self.tx.clone(),
                    ));
                }
                None => self.engine.witness_change_done(None),
            },
            Action::AnnounceState => self.announce(None),
            Action::SendSyncDone { generations } => self.announce(Some(generations)),
            Action::Export(on) => {
                if on != self.exported {
                    self.exported = on;
                    (self.export)(&self.handle, on);
                }
            }
            Action::Notify(n) => self.notify(n),
        }
    }

    fn notify(&mut self, n: Notice) {
        let event = match n {
            Notice::LocalDiskFailed => Some("local-disk-failed"),
            Notice::PeerOutdated => Some("peer-outdated"),
            Notice::SplitBrain => Some("split-brain"),
            Notice::ResyncStarted => Some("resync-started"),
            Notice::ResyncDone => Some("resync-done"),
            Notice::QuorumLost => Some("quorum-lost"),
            Notice::QuorumRegained => Some("quorum-regained"),
            Notice::Fenced => Some("demoted"),
            Notice::PeerRefused(_) | Notice::VerifyDone | Notice::Outdated => None,
        };
        if let Some(e) = event {
            (self.events)(&self.name, e);
        }
        match n {
            Notice::LocalDiskFailed => tracing::error!(
                "volume {}: local disk failed; detached it, serving through the peer",
                self.name
            ),
            Notice::PeerOutdated => tracing::warn!(
                "volume {}: peer {} is outdated; writes continue on this node and are tracked in the bitmap",
                self.name,
                self.peer_name
            ),
            Notice::SplitBrain => tracing::error!(
                "volume {}: split brain: this node and {} wrote independently; not syncing",
                self.name,
                self.peer_name
            ),
            Notice::ResyncStarted => {
                tracing::info!("volume {}: resync to {} started", self.name, self.peer_name)
            }
            Notice::ResyncDone => tracing::info!("volume {}: resync finished", self.name),
            Notice::VerifyDone => {
                let s = self.engine.status();
                if let Some(v) = s.last_verify {
                    tracing::info!(
                        "volume {}: verify done: {} of {} chunks differ{}",
                        self.name,
                        v.mismatched_chunks,
                        v.checked_chunks,
                        if v.mismatched_chunks > 0 {
                            " (marked out of sync; run `blkrep resync`)"
                        } else {
                            ""
                        }
                    );
                }
            }
            Notice::PeerRefused(why) => {
                tracing::warn!("volume {}: peer refused: {why}", self.name)
            }
            Notice::QuorumLost => tracing::error!(
                "volume {}: quorum lost: neither {} nor the witness confirms; writes {}",
                self.name,
                self.peer_name,
                if self.engine.status().quorum_lost {
                    "wait"
                } else {
                    "fail"
                }
            ),
            Notice::QuorumRegained => {
                tracing::info!("volume {}: quorum regained", self.name)
            }
            Notice::Fenced => tracing::error!(
                "volume {}: the witness made {} primary; this node stopped serving",
                self.name,
                self.peer_name
            ),
            Notice::Outdated => tracing::warn!(
                "volume {}: the witness lists this copy as outdated ({} wrote without it)",
                self.name,
                self.peer_name
            ),
        }
    }

    fn local_io(&mut self, id: u64, op: Op, range: Range) {
        let store = self.store.clone();
        let tx = self.tx.clone();
        let buf = self.bufs.get(&id).cloned();
        tokio::spawn(async move {
            if op == Op::Read {
                // A read held back while this copy was being resynced.
                let data = store.read(range.offset, range.len as usize).await.ok();
                let _ = tx.send(Input::LocalRead { id, data });
                return;
            }
            let res = match (op, buf) {
                (Op::Write { fua }, Some(b)) => store.write(range.offset, b, fua).await,
                (Op::Zeroes { fua }, _) => {
                    let r = store.write_zeroes(range.offset, range.len).await;
                    if r.is_ok() && fua {
                        store.flush().await
                    } else {
                        r
                    }
                }
                (Op::Flush, _) => store.flush().await,
                _ => Err(crate::store::StoreError::Stopped),
            };
            if let Err(e) = &res {
                tracing::error!("local I/O failed: {e}");
            }
            let _ = tx.send(Input::LocalDone {
                id,
                ok: res.is_ok(),
            });
        });
    }

    fn peer_io(&mut self, id: u64, op: Op, range: Range, forward: bool) {
        let tx = self.tx.clone();
        let Some(conn) = self.conn.clone() else {
            let _ = tx.send(Input::PeerDone {
                id,
                ok: false,
                data: None,
            });
            return;
        };
        let buf = self.bufs.get(&id).cloned();
        let index = self.index;
        let flags = move |fua: bool| {
            (if fua { FLAG_FUA } else { 0 }) | if forward { FLAG_FORWARD } else { 0 }
        };
        tokio::spawn(async move {
            let (h, payload) = match (op, buf) {
                (Op::Write { fua }, Some(b)) => (
                    data_header(Kind::Write, index, range.offset, 0, flags(fua)),
                    bytes_of(b),
                ),
                (Op::Zeroes { fua }, _) => (
                    data_header(
                        Kind::Zeroes,
                        index,
                        range.offset,
                        range.len as u32,
                        flags(fua),
                    ),
                    bytes::Bytes::new(),
                ),
                (Op::Flush, _) => (
                    data_header(Kind::Flush, index, 0, 0, 0),
                    bytes::Bytes::new(),
                ),
                (Op::Read, _) => (
                    data_header(Kind::ReadRequest, index, range.offset, range.len as u32, 0),
                    bytes::Bytes::new(),
                ),
                _ => {
                    let _ = tx.send(Input::PeerDone {
                        id,
                        ok: false,
                        data: None,
                    });
                    return;
                }
            };
            let r = conn.request(h, payload).await;
            let (ok, data) = match r {
                Ok(reply) => {
                    if reply.status != 0 {
                        tracing::debug!("peer refused {op:?} {range:?}: errno {}", reply.status);
                    }
                    (reply.status == 0, reply.data)
                }
                Err(e) => {
                    tracing::debug!("peer request {op:?} {range:?} lost: {e}");
                    (false, None)
                }
            };
            let _ = tx.send(Input::PeerDone { id, ok, data });
        });
    }

    fn resync_chunk(&mut self, id: u64, range: Range) {
        let tx = self.tx.clone();
        let Some(conn) = self.conn.clone() else {
            let _ = tx.send(Input::PeerDone {
                id,
                ok: false,
                data: None,
            });
            return;
        };
        let store = self.store.clone();
        let index = self.index;
        let start_at = self.resync_pacer.reserve(range.len);
        self.rate_controller.resync_started(range.len);
        let checksum = self.checksum_resync;
        tokio::spawn(async move {
            if let Some(at) = start_at {
                tokio::time::sleep_until(at.into()).await;
            }
            let data = match store.read(range.offset, range.len as usize).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!("resync read failed: {e}");
                    let _ = tx.send(Input::DiskFailed);
                    let _ = tx.send(Input::PeerDone {
                        id,
                        ok: false,
                        data: None,
                    });
                    return;
                }
            };
            if checksum {
                // Checksum-based resync: send the chunk only if it differs.
                let h = data_header(Kind::HashRequest, index, range.offset, range.len as u32, 0);
                let mine = digest(data.as_slice());
                if let Ok(r) = conn.request(h, bytes::Bytes::new()).await
                    && r.status == 0
                    && r.digest.as_deref() == Some(&mine[..])
                {
                    let _ = tx.send(Input::PeerDone {
                        id,
                        ok: true,
                        data: None,
                    });
                    return;
                }
            }
            // A chunk of zeros (never written, or trimmed) travels as a zeroing
            // request: nothing crosses the link and the target punches a hole.
            let reply = if data.as_slice().iter().all(|&b| b == 0) {
                let h = data_header(
                    Kind::Zeroes,
                    index,
                    range.offset,
                    range.len as u32,
                    FLAG_RESYNC,
                );
                conn.request(h, bytes::Bytes::new()).await
            } else {
                let h = data_header(Kind::Write, index, range.offset, 0, FLAG_RESYNC);
                conn.request(h, bytes_of(Arc::new(data))).await
            };
            let ok = matches!(reply, Ok(r) if r.status == 0);
            let _ = tx.send(Input::PeerDone { id, ok, data: None });
        });
    }

    fn verify_chunk(&mut self, id: u64, range: Range) {
        let tx = self.tx.clone();
        let Some(conn) = self.conn.clone() else {
            let _ = tx.send(Input::VerifyDone { id, equal: None });
            return;
        };
        let store = self.store.clone();
        let index = self.index;
        let start_at = self.resync_pacer.reserve(range.len);
        self.rate_controller.resync_started(range.len);
        tokio::spawn(async move {
            if let Some(at) = start_at {
                tokio::time::sleep_until(at.into()).await;
            }
            let h = data_header(Kind::HashRequest, index, range.offset, range.len as u32, 0);
            let (local, remote) = tokio::join!(
                store.read(range.offset, range.len as usize),
                conn.request(h, bytes::Bytes::new())
            );
            let equal = match (local, remote) {
                (Ok(d), Ok(r)) if r.status == 0 => {
                    r.digest.map(|p| p[..] == digest(d.as_slice())[..])
                }
                _ => None,
            };
            let _ = tx.send(Input::VerifyDone { id, equal });
        });
    }

    /// Applies a request from the peer (this node is its replica).
    fn replica(&mut self, conn: Arc<PeerConnection>, req: InboundRequest) {
        let store = self.store.clone();
        let current = self.current_conn_id() == Some(conn.id);
        let accepts = if req.flags & FLAG_RESYNC != 0 {
            self.engine.accepts_resync_writes()
        } else {
            self.engine.accepts_peer_writes()
        } && current;
        let serves_reads = self.engine.serves_peer_reads() && current;
        let range_ok = crate::store::check_range(req.offset, req.len, self.data_bytes).is_ok()
            || req.kind == Kind::Flush;
        if accepts
            && range_ok
            && matches!(req.kind, Kind::Write | Kind::Zeroes)
            && req.flags & FLAG_RESYNC != 0
            && let Some(t) = &mut self.target_sync
        {
            t.received_bytes = t.received_bytes.saturating_add(req.len);
        }
        if range_ok
            && current
            && req.flags & FLAG_FORWARD != 0
            && matches!(req.kind, Kind::Write | Kind::Zeroes)
        {
            return self.forwarded(conn, req);
        }
        self.replica_inflight += 1;
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let fua = req.flags & FLAG_FUA != 0;
            let errno = |r: Result<(), crate::store::StoreError>| match r {
                Ok(()) => 0u32,
                Err(e) => {
                    tracing::error!("replica I/O failed: {e}; detaching the local disk");
                    let _ = tx.send(Input::DiskFailed);
                    libc::EIO as u32
                }
            };
            if !range_ok {
                conn.reply(req.request, libc::EINVAL as u32, None).await;
            } else {
                match req.kind {
                    Kind::Write if accepts => {
                        let status = match req.data {
                            Some(d) => errno(store.write(req.offset, Arc::new(d), fua).await),
                            None => libc::EINVAL as u32,
                        };
                        conn.reply(req.request, status, None).await;
                    }
                    Kind::Zeroes if accepts => {
                        let mut r = store.write_zeroes(req.offset, req.len).await;
                        if r.is_ok() && fua {
                            r = store.flush().await;
                        }
                        conn.reply(req.request, errno(r), None).await;
                    }
                    Kind::Flush if accepts || serves_reads => {
                        conn.reply(req.request, errno(store.flush().await), None)
                            .await;
                    }
                    Kind::HashRequest if accepts => {
                        match store.read(req.offset, req.len as usize).await {
                            Ok(d) => {
                                let dg = digest(d.as_slice()).to_vec();
                                conn.reply_digest(req.request, 0, Some(dg)).await
                            }
                            Err(_) => conn.reply_digest(req.request, libc::EIO as u32, None).await,
                        }
                    }
                    Kind::ReadRequest if serves_reads => {
                        match store.read(req.offset, req.len as usize).await {
                            Ok(d) => {
                                conn.reply(req.request, 0, Some(bytes_of(Arc::new(d))))
                                    .await
                            }
                            Err(_) => conn.reply(req.request, libc::EIO as u32, None).await,
                        }
                    }
                    _ => conn.reply(req.request, libc::EPERM as u32, None).await,
                }
            }
            let _ = tx.send(Input::ReplicaDone);
        });
    }

    /// A write the peer forwarded: it is primary on a copy this node is
    /// resyncing. The engine applies it in order with the resync chunks;
    /// the reply goes out when it completes (`reply_forwarded`). Refused
    /// with EAGAIN when this node is not the peer's sync source (the peer
    /// holds the write back and sends it again).
    fn forwarded(&mut self, conn: Arc<PeerConnection>, req: InboundRequest) {
        let fua = req.flags & FLAG_FUA != 0;
        let op = if req.kind == Kind::Write {
            Op::Write { fua }
        } else {
            Op::Zeroes { fua }
        };
        let submitted = if req.kind == Kind::Write && req.data.is_none() {
            Err(libc::EINVAL)
        } else {
            self.engine
                .submit_forwarded(op, Range::new(req.offset, req.len))
                .ok_or(libc::EAGAIN)
        };
        let id = match submitted {
            Ok(id) => id,
            Err(status) => {
                tokio::spawn(async move { conn.reply(req.request, status as u32, None).await });
                return;
            }
        };
        if let Some(d) = req.data {
            self.bufs.insert(id, Arc::new(d));
        }
        self.replica_inflight += 1;
        self.write_started.insert(id, (Instant::now(), req.len));
        self.forwarded_replies.insert(id, (conn, req.request));
    }

    /// A forwarded write completed: answer the peer.
    fn reply_forwarded(&mut self, conn: Arc<PeerConnection>, request: u64, ok: bool) {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let status = if ok { 0 } else { libc::EIO as u32 };
            conn.reply(request, status, None).await;
            let _ = tx.send(Input::ReplicaDone);
        });
    }
}

/// SHA-256 of a chunk (verify and checksum-based resync).
fn digest(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::activity_log::AlSnapshot;
    use crate::meta::bitmap::BITMAP_PAGE_BYTES;

    /// An engine of a 16 MiB up-to-date volume (generation 5, no witness).
    fn up_to_date_engine() -> Engine {
        let cfg = EngineConfig {
            data_bytes: 16 << 20,
            chunk_bytes: 65536,
            tie_winner: true,
            al_extent_bytes: 4 << 20,
            al_extents: 16,
            quorum: None,
            volatile_cache: true,
        };
        let gens = crate::meta::Generations {
            current: 5,
            ..Default::default()
        };
        Engine::new(
            cfg,
            DiskState::UpToDate,
            gens,
            Bitmap::new(16 << 20, 65536),
            1,
        )
    }

    /// Issue 13: after an unclean stop, the same boot id means only the
    /// process died (nothing is lost; the disk is flushed), another boot id
    /// a possible power cut (the copy is marked and refuses promotion); a
    /// superblock from before the boot id existed counts as another boot.
    #[test]
    fn an_unclean_stop_on_another_boot_marks_the_copy_as_having_lost_power() {
        let dir = std::env::temp_dir().join(format!("blkrep-boot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let disk = dir.join("disk");
        std::fs::write(&disk, vec![0u8; 4096]).expect("disk");
        let sb = |boot_id| Superblock {
            seq: 1,
            volume_name: "v".into(),
            data_bytes: 16 << 20,
            chunk_bytes: 65536,
            disk_state: DiskState::UpToDate,
            generations: Default::default(),
            attached: true,
            primary: false,
            record: Default::default(),
            boot_id,
            cache_lost: false,
        };
        let now = [7u8; 16];
        let mut same = up_to_date_engine();
        note_unclean_stop(&sb(now), now, &disk, "v", &mut same).expect("same boot");
        assert!(!same.status().cache_lost);
        assert!(same.promote_check(false).is_ok());
        for earlier in [[8u8; 16], [0u8; 16]] {
            let mut other = up_to_date_engine();
            note_unclean_stop(&sb(earlier), now, &disk, "v", &mut other).expect("other boot");
            assert!(other.status().cache_lost);
            assert_eq!(
                other.promote_check(false),
                Err(crate::engine::PromoteError::CacheLost)
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Issue 13, hole 2a: a clean attach continues the activity log's
    /// numbering after the newest snapshot on disk. (It restarted at 0, so
    /// the previous attach's snapshot outranked this attach's first ones and
    /// a crash recovery would have used the stale extents.)
    #[test]
    fn a_clean_attach_continues_the_activity_log_numbering() {
        let (meta, path) = crate::meta::device::tests::scratch_meta("al-resume");
        meta.read_activity_log().expect("read");
        for seq in [10, 11] {
            let old = AlSnapshot {
                seq,
                extent_bytes: 4 << 20,
                extents: vec![0],
            };
            meta.write_activity_log(&old).expect("write");
        }
        // Attach again (cleanly), become primary, write to a new extent.
        let meta = MetaDevice::open(&path, *meta.layout()).expect("reopen");
        let mut engine = up_to_date_engine();
        resume_activity_log(&meta, &mut engine, false, "v");
        engine.promote(false).expect("promote");
        engine.submit(1, Op::Write { fua: false }, Range::new(8 << 20, 4096));
        let mut written = None;
        while let Some(a) = engine.poll_action() {
            if let Action::PersistMeta {
                activity_log: Some(al),
                ..
            } = a
            {
                meta.write_activity_log(&al).expect("write");
                written = Some(al);
            }
        }
        let written = written.expect("the new extent is logged");
        assert_eq!(written.extents, vec![2]);
        // Recovery after a crash now would use this snapshot, not extent 0.
        let meta = MetaDevice::open(&path, *meta.layout()).expect("reopen");
        assert_eq!(meta.read_activity_log().expect("read"), Some(written));
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }

    fn job(token: u64, al_seq: Option<u64>, pages: &[(u32, u8)]) -> MetaJob {
        MetaJob {
            write: MetaWrite::Engine(MetaToken::from_seq(token).expect("token 1 or later")),
            activity_log: al_seq.map(|seq| AlSnapshot {
                seq,
                extent_bytes: 4 << 20,
                extents: vec![seq as u32],
            }),
            disk: DiskState::UpToDate,
            generations: crate::meta::Generations {
                current: token,
                ..Default::default()
            },
            primary: token % 2 == 0,
            attached: true,
            pages: pages
                .iter()
                .map(|&(p, fill)| (p, Box::new([fill; BITMAP_PAGE_BYTES])))
                .collect(),
            record: Default::default(),
            cache_lost: false,
            flush_data: false,
        }
    }

    #[test]
    fn folded_metadata_jobs_keep_the_newest_of_everything() {
        let merged = job(1, Some(10), &[(0, 1), (5, 1)])
            .then(job(2, None, &[(5, 2), (7, 2)]))
            .then(job(3, Some(11), &[]));
        assert_eq!(
            merged.write,
            MetaWrite::Engine(MetaToken::from_seq(3).expect("token"))
        );
        assert_eq!(merged.generations.current, 3);
        assert!(!merged.primary);
        assert_eq!(merged.activity_log.map(|a| a.seq), Some(11));
        let mut pages: Vec<(u32, u8)> = merged.pages.iter().map(|(p, b)| (*p, b[0])).collect();
        pages.sort_unstable();
        assert_eq!(pages, vec![(0, 1), (5, 2), (7, 2)]);
        // A newer job without a snapshot keeps the older one.
        let kept = job(1, Some(10), &[]).then(job(2, None, &[]));
        assert_eq!(kept.activity_log.map(|a| a.seq), Some(10));
    }
}
