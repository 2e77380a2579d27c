//! A store wrapper that injects faults: a dead disk, failing writes, torn
//! writes (only the first part of a write reaches the disk, then an error),
//! and a volatile write cache that a power cut drops.
//!
//! The volatile cache (drills only): a write without FUA completes once it
//! is in this process's memory; it reaches the disk only when a flush
//! covers it (every write completed before the flush was issued) or a FUA
//! write of the same block supersedes it. `FaultPlan::power_cut` writes a
//! seeded subset of what is still cached and ends the process at once: the
//! disk then holds what a disk with a volatile cache holds after a power
//! cut (the flushed writes, and any subset of the others).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::{AlignedBuf, BlockStore, IoFuture, StoreError};

/// What to inject; shared so a test or the control socket can change it live.
#[derive(Debug, Default)]
pub struct FaultPlan {
    /// Every operation fails (a dead disk).
    pub fail_all: AtomicBool,
    /// Writes fail after this many more succeed (u64::MAX: never).
    pub writes_before_failure: AtomicU64,
    /// The next write is torn: its first half is written, then it fails.
    pub tear_next_write: AtomicBool,
    /// The next write of at least 8 KiB is torn as by a power cut: its
    /// first half reaches the disk and it never completes.
    pub tear_next_write_and_hang: AtomicBool,
    /// Every write waits this long before it reaches the disk (a slow disk).
    pub write_delay_ms: AtomicU64,
    /// The volatile write cache, when enabled (see the module doc).
    cache: Mutex<Option<VolatileCache>>,
    /// Serialises what reaches the disk in volatile-cache mode (flush
    /// write-outs, FUA writes, zeroing): an older cached block is never
    /// written over a newer durable one.
    disk_order: tokio::sync::Mutex<()>,
}

/// Completed writes not yet on the disk, per 4 KiB block: the sequence
/// number of the write and its bytes.
#[derive(Debug, Default)]
struct VolatileCache {
    next_seq: u64,
    blocks: BTreeMap<u64, (u64, Arc<AlignedBuf>)>,
}

/// Bytes of one cached block.
const CACHE_BLOCK_BYTES: u64 = 4096;

/// Longest write of a flush's write-back (runs never cross a multiple).
const WRITE_BACK_RUN_BYTES: u64 = 1 << 20;

impl FaultPlan {
    /// A plan that injects nothing.
    pub fn healthy() -> Arc<Self> {
        Arc::new(FaultPlan {
            fail_all: AtomicBool::new(false),
            writes_before_failure: AtomicU64::new(u64::MAX),
            tear_next_write: AtomicBool::new(false),
            tear_next_write_and_hang: AtomicBool::new(false),
            write_delay_ms: AtomicU64::new(0),
            cache: Mutex::new(None),
            disk_order: tokio::sync::Mutex::new(()),
        })
    }

    /// Gives the disk a volatile write cache (before any write).
    pub fn enable_volatile_cache(&self) {
        *self.lock_cache() = Some(VolatileCache::default());
    }

    /// Whether the disk has a volatile write cache.
    pub fn volatile_cache(&self) -> bool {
        self.lock_cache().is_some()
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, Option<VolatileCache>> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A power cut of the volatile cache: a subset of the cached blocks
    /// (each kept with probability one half, from `seed`) is written to
    /// `disk` at its data offsets and synced; the rest is lost. Returns
    /// (kept, dropped). The caller ends the process right after.
    pub fn power_cut(&self, disk: &std::path::Path, seed: u64) -> std::io::Result<(usize, usize)> {
        use std::os::unix::fs::FileExt;
        let Some(cache) = self.lock_cache().take() else {
            return Ok((0, 0));
        };
        let file = std::fs::OpenOptions::new().write(true).open(disk)?;
        let mut rng = crate::testkit::rng::SplitMix64(seed);
        let (mut kept, mut dropped) = (0, 0);
        for (offset, (_, data)) in cache.blocks {
            if rng.below(2) == 0 {
                file.write_all_at(data.as_slice(), offset)?;
                kept += 1;
            } else {
                dropped += 1;
            }
        }
        file.sync_data()?;
        Ok((kept, dropped))
    }

    fn write_should_fail(&self) -> bool {
        if self.fail_all.load(Ordering::Relaxed) {
            return true;
        }
        let left = self.writes_before_failure.load(Ordering::Relaxed);
        if left == u64::MAX {
            return false;
        }
        if left == 0 {
            return true;
        }
        self.writes_before_failure.fetch_sub(1, Ordering::Relaxed);
        false
    }
}

impl FaultPlan {
    fn next_seq(&self) -> u64 {
        let mut cache = self.lock_cache();
        let Some(c) = cache.as_mut() else { return 0 };
        c.next_seq += 1;
        c.next_seq - 1
    }

    /// Forgets the cached blocks of `[offset, offset+len)` written before
    /// `seq` (a durable write of them supersedes them).
    fn drop_cached(&self, offset: u64, len: u64, seq: u64) {
        if let Some(c) = self.lock_cache().as_mut() {
            let first = offset / CACHE_BLOCK_BYTES * CACHE_BLOCK_BYTES;
            let stale: Vec<u64> = c
                .blocks
                .range(first..offset + len)
                .filter(|(_, (s, _))| *s < seq)
                .map(|(&at, _)| at)
                .collect();
            for at in stale {
                c.blocks.remove(&at);
            }
        }
    }
}

impl<S: BlockStore> FaultyStore<S> {
    /// A write in volatile-cache mode: into the cache (completed at once),
    /// or with FUA through to the disk, superseding the cached blocks.
    fn cached_write(&self, offset: u64, buf: Arc<AlignedBuf>, fua: bool) -> IoFuture<()> {
        if offset % CACHE_BLOCK_BYTES != 0 || buf.len() as u64 % CACHE_BLOCK_BYTES != 0 {
            return self.inner.write(offset, buf, fua);
        }
        let seq = self.plan.next_seq();
        if fua {
            let (inner, plan) = (self.inner.clone(), self.plan.clone());
            return Box::pin(async move {
                let _order = plan.disk_order.lock().await;
                let len = buf.len() as u64;
                inner.write(offset, buf, true).await?;
                plan.drop_cached(offset, len, seq);
                Ok(())
            });
        }
        if let Some(c) = self.plan.lock_cache().as_mut() {
            for (i, block) in buf
                .as_slice()
                .chunks(CACHE_BLOCK_BYTES as usize)
                .enumerate()
            {
                let at = offset + i as u64 * CACHE_BLOCK_BYTES;
                c.blocks
                    .insert(at, (seq, Arc::new(AlignedBuf::copy_from(block))));
            }
        }
        Box::pin(async { Ok(()) })
    }
}

/// The first half of a write (whole 4 KiB blocks).
fn first_half(buf: &AlignedBuf) -> Arc<AlignedBuf> {
    let half = (buf.len() / 2) / 4096 * 4096;
    Arc::new(AlignedBuf::copy_from(&buf.as_slice()[..half]))
}

/// Wraps a store and applies a `FaultPlan`.
pub struct FaultyStore<S> {
    inner: Arc<S>,
    plan: Arc<FaultPlan>,
}

impl<S: BlockStore> FaultyStore<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, plan: Arc<FaultPlan>) -> Self {
        FaultyStore {
            inner: Arc::new(inner),
            plan,
        }
    }
}

impl<S: BlockStore> BlockStore for FaultyStore<S> {
    fn read(&self, offset: u64, len: usize) -> IoFuture<AlignedBuf> {
        if self.plan.fail_all.load(Ordering::Relaxed) {
            return Box::pin(async { Err(StoreError::Injected) });
        }
        if !self.plan.volatile_cache() {
            return self.inner.read(offset, len);
        }
        let fut = self.inner.read(offset, len);
        let plan = self.plan.clone();
        Box::pin(async move {
            let mut buf = fut.await?;
            // What the cache holds is newer than the disk.
            if let Some(cache) = plan.lock_cache().as_ref() {
                let end = offset + len as u64;
                let first = offset / CACHE_BLOCK_BYTES * CACHE_BLOCK_BYTES;
                for (&at, (_, data)) in cache.blocks.range(first..end) {
                    let from = at.max(offset);
                    let to = (at + CACHE_BLOCK_BYTES).min(end);
                    if from >= to {
                        continue;
                    }
                    buf.as_mut_slice()[(from - offset) as usize..(to - offset) as usize]
                        .copy_from_slice(
                            &data.as_slice()[(from - at) as usize..(to - at) as usize],
                        );
                }
            }
            Ok(buf)
        })
    }

    fn write(&self, offset: u64, buf: Arc<AlignedBuf>, fua: bool) -> IoFuture<()> {
        let tear = |flag: &AtomicBool| buf.len() >= 8192 && flag.swap(false, Ordering::Relaxed);
        if tear(&self.plan.tear_next_write) {
            let fut = self.inner.write(offset, first_half(&buf), fua);
            return Box::pin(async move {
                fut.await?;
                Err(StoreError::Injected)
            });
        }
        if tear(&self.plan.tear_next_write_and_hang) {
            let fut = self.inner.write(offset, first_half(&buf), fua);
            return Box::pin(async move {
                fut.await?;
                std::future::pending().await
            });
        }
        if self.plan.write_should_fail() {
            return Box::pin(async { Err(StoreError::Injected) });
        }
        if self.plan.volatile_cache() {
            return self.cached_write(offset, buf, fua);
        }
        let delay_ms = self.plan.write_delay_ms.load(Ordering::Relaxed);
        if delay_ms > 0 {
            let inner = self.inner.clone();
            return Box::pin(async move {
                tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
                inner.write(offset, buf, fua).await
            });
        }
        self.inner.write(offset, buf, fua)
    }

    fn flush(&self) -> IoFuture<()> {
        if self.plan.fail_all.load(Ordering::Relaxed) {
            return Box::pin(async { Err(StoreError::Injected) });
        }
        if !self.plan.volatile_cache() {
            return self.inner.flush();
        }
        // Covers every write completed before now.
        let boundary = self.plan.lock_cache().as_ref().map_or(0, |c| c.next_seq);
        let (inner, plan) = (self.inner.clone(), self.plan.clone());
        Box::pin(async move {
            let _order = plan.disk_order.lock().await;
            let due: Vec<(u64, u64, Arc<AlignedBuf>)> = plan
                .lock_cache()
                .as_ref()
                .map(|c| {
                    c.blocks
                        .iter()
                        .filter(|(_, (seq, _))| *seq < boundary)
                        .map(|(&at, (seq, data))| (at, *seq, data.clone()))
                        .collect()
                })
                .unwrap_or_default();
            // Adjacent blocks go out as one write (up to 1 MiB), as a
            // disk writes back its cache: a flush after a resync costs a
            // few writes, not one per 4 KiB block.
            for run in due
                .chunk_by(|a, b| b.0 == a.0 + CACHE_BLOCK_BYTES && b.0 % WRITE_BACK_RUN_BYTES != 0)
            {
                let data = if let [(_, _, one)] = run {
                    one.clone()
                } else {
                    let mut buf = AlignedBuf::zeroed(run.len() * CACHE_BLOCK_BYTES as usize);
                    for (i, (_, _, d)) in run.iter().enumerate() {
                        let at = i * CACHE_BLOCK_BYTES as usize;
                        buf.as_mut_slice()[at..at + CACHE_BLOCK_BYTES as usize]
                            .copy_from_slice(d.as_slice());
                    }
                    Arc::new(buf)
                };
                inner.write(run[0].0, data, false).await?;
            }
            inner.flush().await?;
            if let Some(c) = plan.lock_cache().as_mut() {
                for (at, seq, _) in due {
                    if c.blocks.get(&at).is_some_and(|(s, _)| *s == seq) {
                        c.blocks.remove(&at);
                    }
                }
            }
            Ok(())
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> IoFuture<()> {
        if self.plan.write_should_fail() {
            return Box::pin(async { Err(StoreError::Injected) });
        }
        if !self.plan.volatile_cache() {
            return self.inner.write_zeroes(offset, len);
        }
        // (Zeroing goes to the disk at once: the cached blocks it covers
        // are superseded.)
        let seq = self.plan.next_seq();
        let (inner, plan) = (self.inner.clone(), self.plan.clone());
        Box::pin(async move {
            let _order = plan.disk_order.lock().await;
            plan.drop_cached(offset, len, seq);
            inner.write_zeroes(offset, len).await
        })
    }

    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::UringStore;
    use crate::store::uring::Uring;

    fn block(byte: u8) -> Arc<AlignedBuf> {
        let mut b = AlignedBuf::zeroed(CACHE_BLOCK_BYTES as usize);
        b.as_mut_slice().fill(byte);
        Arc::new(b)
    }

    /// A flush writes back exactly the cached blocks (adjacent ones in
    /// runs, a run split at the 1 MiB boundary, a lone block apart); a
    /// power cut after it loses none of them, and nothing else is written.
    #[tokio::test]
    async fn a_flush_writes_back_every_cached_block_in_runs() {
        let path = std::env::temp_dir().join(format!("blkrep-faulty-{}.img", std::process::id()));
        let size = 4u64 << 20;
        std::fs::write(&path, vec![0u8; size as usize]).expect("image");
        let ring = Uring::start().expect("io_uring");
        let plan = FaultPlan::healthy();
        plan.enable_volatile_cache();
        let store = FaultyStore::new(
            UringStore::open(&path, size, ring).expect("open"),
            plan.clone(),
        );
        let mut expect = vec![0u8; size as usize];
        let mut at = |offset: u64, byte: u8| {
            let b = block(byte);
            expect[offset as usize..(offset + CACHE_BLOCK_BYTES) as usize].fill(byte);
            (offset, b)
        };
        let writes = [
            at(0, 1),
            at(4096, 2),
            at(8192, 3),
            at((1 << 20) - 8192, 4),
            at((1 << 20) - 4096, 5),
            at(1 << 20, 6),
            at((1 << 20) + 4096, 7),
            at(3 << 20, 8),
        ];
        for (offset, b) in writes {
            store.write(offset, b, false).await.expect("cached write");
        }
        assert_eq!(
            std::fs::read(&path).expect("read"),
            vec![0u8; size as usize],
            "nothing reached the disk before the flush"
        );
        store.flush().await.expect("flush");
        assert_eq!(
            plan.power_cut(&path, 1).expect("cut"),
            (0, 0),
            "nothing left cached"
        );
        let on_disk = std::fs::read(&path).expect("read");
        let _ = std::fs::remove_file(&path);
        assert!(
            on_disk == expect,
            "the disk holds exactly the flushed blocks"
        );
    }
}
