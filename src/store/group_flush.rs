//! Group commit of flushes: many writers that each need "my completed write
//! is durable" share one flush of the store instead of one each. A resync
//! target uses it before it acknowledges a chunk, because the source then
//! stops tracking that chunk: an acknowledged chunk must survive a power
//! loss of the target.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{BlockStore, StoreError};

/// Shares flushes among concurrent callers.
pub struct GroupFlush {
    store: Arc<dyn BlockStore>,
    /// Tickets handed out: each is taken after its caller's write completed.
    issued: AtomicU64,
    /// Every ticket up to this one is covered by a finished flush.
    durable: AtomicU64,
    /// One flush at a time; waiters behind it often find themselves covered.
    running: tokio::sync::Mutex<()>,
    /// Flushes actually issued (for tests and status).
    flushes: AtomicU64,
}

impl GroupFlush {
    /// Flushes of `store`.
    pub fn new(store: Arc<dyn BlockStore>) -> Self {
        GroupFlush {
            store,
            issued: AtomicU64::new(0),
            durable: AtomicU64::new(0),
            running: tokio::sync::Mutex::new(()),
            flushes: AtomicU64::new(0),
        }
    }

    /// Returns once every write that completed before this call is durable.
    pub async fn after_write(&self) -> Result<(), StoreError> {
        let ticket = self.issued.fetch_add(1, Ordering::AcqRel) + 1;
        let _turn = self.running.lock().await;
        if self.durable.load(Ordering::Acquire) >= ticket {
            // A flush that started after our ticket covered our write.
            return Ok(());
        }
        // Every ticket handed out so far belongs to a completed write, so
        // the flush about to start covers all of them.
        let upto = self.issued.load(Ordering::Acquire);
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.store.flush().await?;
        self.durable.fetch_max(upto, Ordering::AcqRel);
        Ok(())
    }

    /// Flushes issued so far.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{AlignedBuf, IoFuture};
    use std::sync::Mutex;

    /// A store whose writes land in a volatile cache until a flush.
    #[derive(Default)]
    struct CachedStore {
        cache: Mutex<Vec<u64>>,
        stable: Mutex<Vec<u64>>,
    }

    impl BlockStore for CachedStore {
        fn read(&self, _offset: u64, _len: usize) -> IoFuture<AlignedBuf> {
            Box::pin(async { Err(StoreError::Stopped) })
        }
        fn write(&self, offset: u64, _buf: Arc<AlignedBuf>, _fua: bool) -> IoFuture<()> {
            if let Ok(mut c) = self.cache.lock() {
                c.push(offset);
            }
            Box::pin(async { Ok(()) })
        }
        fn flush(&self) -> IoFuture<()> {
            let moved: Vec<u64> = self
                .cache
                .lock()
                .map(|mut c| std::mem::take(&mut *c))
                .unwrap_or_default();
            if let Ok(mut s) = self.stable.lock() {
                s.extend(moved);
            }
            Box::pin(async {
                tokio::task::yield_now().await;
                Ok(())
            })
        }
        fn write_zeroes(&self, _offset: u64, _len: u64) -> IoFuture<()> {
            Box::pin(async { Ok(()) })
        }
        fn size_bytes(&self) -> u64 {
            1 << 30
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_acknowledged_write_is_stable_and_flushes_are_shared() {
        let store = Arc::new(CachedStore::default());
        let group = Arc::new(GroupFlush::new(store.clone()));
        let all_written = Arc::new(tokio::sync::Barrier::new(64));
        let mut tasks = Vec::new();
        for i in 0..64u64 {
            let (store, group) = (store.clone(), group.clone());
            let all_written = all_written.clone();
            tasks.push(tokio::spawn(async move {
                store
                    .write(i * 4096, Arc::new(AlignedBuf::zeroed(4096)), false)
                    .await
                    .expect("write");
                all_written.wait().await;
                group.after_write().await.expect("flush");
                // Acknowledged: it must be on stable storage now.
                let stable = store.stable.lock().is_ok_and(|s| s.contains(&(i * 4096)));
                assert!(stable, "write {i} acknowledged from the cache");
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        assert!(group.flushes() >= 1);
        // The first flush covers whoever had a ticket when it started; the
        // second covers everyone else: a handful, not one per write.
        assert!(
            group.flushes() <= 8,
            "{} flushes for 64 concurrent writes: they were not shared",
            group.flushes()
        );
    }
}
