//! Attaching a volume: open the data disk and the metadata, recover what a
//! crash or a power cut left (the activity log, the lost-power mark), build
//! the engine and start the volume task with its helpers (the metadata
//! writer, the ticker, the control sender).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64};

use tokio::sync::{Semaphore, mpsc};

use super::{Shell, meta_writer};
use crate::config::MetaLocation;
use crate::engine::{Engine, EngineConfig};
use crate::link::{PeerConnection, VolumeStateMsg};
use crate::meta::{Bitmap, DiskState, MetaDevice, MetaError, MetaLayout, Superblock};
use crate::resync::{Pacer, RateController};
use crate::store::uring::Uring;
use crate::store::{BlockStore, FaultPlan, FaultyStore, UringStore, backing};
use crate::volume::{HandleInner, Input, VolumeError, VolumeHandle, encode_read_path};

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
    pub quorum: Option<crate::volume::QuorumAttach>,
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
        client_requests_max: crate::volume::CLIENT_INFLIGHT_MAX,
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
    let lease = opts.quorum.as_ref().map(crate::volume::VolumeLease::new);
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
            permits: Semaphore::new(crate::volume::CLIENT_INFLIGHT_MAX),
            client_bytes: Arc::new(Semaphore::new(crate::volume::CLIENT_INFLIGHT_BYTES_MAX)),
            data_bytes,
            lease: lease.clone(),
        }),
    };
    let chunk_bytes = u64::from(sb.chunk_bytes);
    let (meta_tx, meta_rx) = mpsc::unbounded_channel();
    let metadata_writes = Arc::new(AtomicU64::new(0));
    tokio::spawn(meta_writer::write_in_order(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Action, Op, Range};
    use crate::meta::activity_log::AlSnapshot;

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
            client_requests_max: crate::volume::CLIENT_INFLIGHT_MAX,
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
}
