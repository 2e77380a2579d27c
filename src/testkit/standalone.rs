//! A volume attached on a file in this process: the real shell, engine and
//! io_uring store, for the fuzz targets. `primary_on_file` has no peer and
//! is promoted (driving a frontend: the NBD target); `secondary_on_file`
//! waits for a peer on a link (the replica side: the replica-session
//! target).

use std::path::Path;
use std::sync::Arc;

use crate::config::MetaLocation;
use crate::volume::{AttachOptions, VolumeHandle};

/// Creates a `size_bytes` file at `disk` (replacing it), writes fresh
/// metadata, attaches it as volume `name` with no peer and promotes it
/// (`--force`: a new volume has no up-to-date copy yet).
pub async fn primary_on_file(
    disk: &Path,
    name: &str,
    size_bytes: u64,
) -> Result<VolumeHandle, String> {
    let volume = secondary_on_file(disk, name, size_bytes, "alpha", "beta").await?;
    volume.promote(true).await.map_err(|e| e.to_string())?;
    Ok(volume)
}

/// Creates a `size_bytes` file at `disk` (replacing it), writes fresh
/// metadata (an Inconsistent copy with no history) and attaches it as
/// volume `name` on node `node`, secondary, replicating with `peer`: the
/// caller hands it that peer's connections (`connection_changed`).
pub async fn secondary_on_file(
    disk: &Path,
    name: &str,
    size_bytes: u64,
    node: &str,
    peer: &str,
) -> Result<VolumeHandle, String> {
    let f = std::fs::File::create(disk).map_err(|e| format!("{}: {e}", disk.display()))?;
    f.set_len(size_bytes).map_err(|e| e.to_string())?;
    drop(f);
    crate::volume::create_metadata(
        disk,
        &MetaLocation::Internal,
        name,
        crate::meta::DEFAULT_CHUNK_BYTES,
        true,
    )
    .map_err(|e| e.to_string())?;
    let opts = AttachOptions {
        name: name.to_string(),
        index: 0,
        disk: disk.to_path_buf(),
        meta: MetaLocation::Internal,
        node: node.into(),
        peer: peer.into(),
        resync_rate: crate::resync::RateSettings {
            min_bytes_per_s: 1 << 20,
            max_bytes_per_s: 0,
            app_latency_target: std::time::Duration::ZERO,
        },
        al_extents: crate::meta::activity_log::AL_EXTENTS_MIN,
        volatile_cache: false,
        boot_id: None,
        ring: crate::store::uring::Uring::start().map_err(|e| e.to_string())?,
        faults: None,
        export: Arc::new(|_, _| {}),
        events: Arc::new(|_, _| {}),
        quorum: None,
    };
    crate::volume::attach(opts).await.map_err(|e| e.to_string())
}

/// The runtime a fuzz target drives its fixture on: one worker thread (the
/// fuzzer's own thread blocks on it) with timers and I/O.
pub fn fuzz_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
}
