//! A store wrapper that injects faults: a dead disk, failing writes, and torn
//! writes (only the first part of a write reaches the disk, then an error).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

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
}

impl FaultPlan {
    /// A plan that injects nothing.
    pub fn healthy() -> Arc<Self> {
        Arc::new(FaultPlan {
            fail_all: AtomicBool::new(false),
            writes_before_failure: AtomicU64::new(u64::MAX),
            tear_next_write: AtomicBool::new(false),
            tear_next_write_and_hang: AtomicBool::new(false),
            write_delay_ms: AtomicU64::new(0),
        })
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
        self.inner.read(offset, len)
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
        self.inner.flush()
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> IoFuture<()> {
        if self.plan.write_should_fail() {
            return Box::pin(async { Err(StoreError::Injected) });
        }
        self.inner.write_zeroes(offset, len)
    }

    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
}
